"""Typed schema of ``params.yaml``.

Every hyperparameter the pipeline uses lives in ``params.yaml``; this module is the one place
that says which keys exist, their types and their ranges. Loading is strict: an unknown or
misspelled key, a wrong type or an out-of-range value stops with one message naming the key
(and the nearest valid key), before any work starts.

The library never reads ``params.yaml`` by itself: stage scripts call :func:`load_params`
and hand the typed sections to ``tlflax`` functions.

The sections are defined in :mod:`tlflax.config_data` (``prepare``, ``validate``) and
:mod:`tlflax.config_training` (the stages that train and score models), on the base of
:mod:`tlflax.config_base`; every name stays importable from here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tlflax.config_base import (
    Modality,
    NonEmptyString,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    StrictSection,
)
from tlflax.config_data import (
    DATASET_MODALITY,
    TFDS_DATASET_PATTERN,
    TFDS_PREFIX,
    PrepareParams,
    ValidateParams,
)
from tlflax.config_training import (
    AUGMENT_KEYS_BY_MODALITY,
    AUTO_BACKBONE,
    AdviseParams,
    AugmentParams,
    BaselineParams,
    ClassBalanceParams,
    ContrastiveParams,
    EvaluateParams,
    ExtractParams,
    FinetuneParams,
    Strategy,
    TrainHeadParams,
    TrainScratchParams,
    TransferRule,
)
from tlflax.errors import InputError

__all__ = [
    "AUTO_BACKBONE",
    "DATASET_MODALITY",
    "TFDS_DATASET_PATTERN",
    "TFDS_PREFIX",
    "AdviseParams",
    "AugmentParams",
    "BaselineParams",
    "ClassBalanceParams",
    "ContrastiveParams",
    "EvaluateParams",
    "ExtractParams",
    "FinetuneParams",
    "Modality",
    "NonEmptyString",
    "NonNegativeFloat",
    "NonNegativeInt",
    "Params",
    "ParamsError",
    "PositiveFloat",
    "PositiveInt",
    "PrepareParams",
    "Probability",
    "Strategy",
    "StrictSection",
    "TrainHeadParams",
    "TrainScratchParams",
    "TransferRule",
    "ValidateParams",
    "load_params",
    "parse_params",
]


class ParamsError(InputError):
    """A ``params.yaml`` that cannot be used; the message names the file and key."""


class Params(StrictSection):
    """The whole ``params.yaml``: one section per stage (stage name = script name = section)."""

    experiment: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$")] = "vision"
    prepare: PrepareParams = PrepareParams()
    validate_: ValidateParams = Field(default=ValidateParams(), alias="validate")
    baseline: BaselineParams = BaselineParams()
    extract: ExtractParams = ExtractParams()
    train_head: TrainHeadParams = TrainHeadParams()
    advise: AdviseParams = AdviseParams()
    finetune: FinetuneParams = FinetuneParams()
    train_scratch: TrainScratchParams = TrainScratchParams()
    evaluate: EvaluateParams = EvaluateParams()
    # Not a stage's: train_head, plan (finetune, train_scratch) and validate all read it.
    class_balance: ClassBalanceParams = ClassBalanceParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def validate_params(self) -> ValidateParams:
        return self.validate_

    def with_backbone(self, name: str) -> Params:
        """These params with ``extract.backbone`` set to ``name`` (e.g. the advised one)."""
        return self.model_copy(
            update={"extract": self.extract.model_copy(update={"backbone": name})}
        )

    def with_chosen_backbone(self, chosen: Callable[[], str]) -> Params:
        """With ``extract.backbone: auto``, these params with ``chosen()`` (the backbone the
        advise stage picked) written in; otherwise these params (``chosen`` is not called)."""
        if self.extract.backbone != AUTO_BACKBONE:
            return self
        return self.with_backbone(chosen())

    @model_validator(mode="after")
    def _keys_fit_the_modality(self) -> Params:
        # A key of the other modality would be silently ignored; say so instead. (Whether
        # extract.backbone takes this modality is checked where the backbone registry is
        # loaded: importing the models here would make every params load import JAX.)
        modality = self.prepare.modality
        for section_name, section, key in _keys_of_other_modalities(self, modality):
            if key in section.model_fields_set:
                raise ValueError(
                    f"'{section_name}.{key}' does not apply to prepare.dataset "
                    f"'{self.prepare.dataset}' ({modality} data); remove it"
                )
        finetune = self.finetune
        augment = finetune.augment
        augmented = (
            augment.random_crop
            or augment.flip
            or augment.test_time_flip
            or augment.random_erasing > 0
            or augment.cutmix > 0
        )
        if (
            modality == "image"
            and finetune.cache_frozen_prefix
            and (augmented or finetune.batchnorm == "train")
        ):
            raise ValueError(
                "'finetune.cache_frozen_prefix' needs finetune.augment off (random_crop, "
                "flip and test_time_flip false, random_erasing and cutmix 0) and "
                "finetune.batchnorm 'frozen': both change the frozen layers' outputs from "
                "step to step"
            )
        if modality == "audio" and finetune.cache_frozen_prefix and augment.spec_augment:
            raise ValueError(
                "'finetune.cache_frozen_prefix' needs finetune.augment.spec_augment false: "
                "masking changes the frozen layers' outputs from step to step"
            )
        return self


def _keys_of_other_modalities(
    params: Params, modality: str
) -> list[tuple[str, StrictSection, str]]:
    """(section name, section, key) of the keys that only another modality reads."""
    extract, augment, validate = params.extract, params.finetune.augment, params.validate_
    image_augment = [
        ("finetune.augment", augment, key) for key in AUGMENT_KEYS_BY_MODALITY["image"]
    ]
    audio_validation = [
        ("validate", validate, key) for key in ("max_silent_fraction", "max_clipped_fraction")
    ]
    text_extract = [("extract", extract, key) for key in ("max_length", "truncation_side")]
    text_finetune = [("finetune", params.finetune, "contrastive")]
    return {
        "image": [
            *text_extract,
            *text_finetune,
            *(("finetune.augment", augment, key) for key in AUGMENT_KEYS_BY_MODALITY["audio"]),
            *audio_validation,
        ],
        "text": [
            ("extract", extract, "image_size"),
            ("finetune", params.finetune, "augment"),
            ("finetune", params.finetune, "batchnorm"),
            *audio_validation,
        ],
        "audio": [
            ("extract", extract, "image_size"),
            *text_extract,
            *text_finetune,
            *image_augment,
        ],
    }[modality]


def _model_for(location: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The schema class whose fields are valid at ``location`` (for "did you mean")."""
    model: type[BaseModel] | None = Params
    for part in location:
        if model is None or isinstance(part, int):
            continue
        field = next(
            (f for name, f in model.model_fields.items() if (f.alias or name) == part), None
        )
        if field is None:
            return model
        model = _section_in(field.annotation)
    return model


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The schema class inside a field's type: ``X``, ``list[X]``, ``list[X] | None``, ..."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _section_in(argument)
        if found is not None:
            return found
    return None


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so that a message stays one line."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _describe(error: dict[str, Any], source: str) -> str:
    location = tuple(error["loc"])
    # A misspelled key may hold any character, a line break included.
    key = _printable(".".join(str(part) for part in location))
    if error["type"] == "extra_forbidden":
        parent = _model_for(location[:-1])
        valid = [f.alias or name for name, f in parent.model_fields.items()] if parent else []
        nearest = difflib.get_close_matches(str(location[-1]), valid, n=1, cutoff=0.5)
        hint = (
            f" (did you mean '{nearest[0]}'?)" if nearest else f" (valid keys: {', '.join(valid)})"
        )
        return f"{source}: unknown key '{key}'{hint}"
    if error["type"] == "value_error":
        # Our own cross-field checks: the message names the keys; the input is a whole section.
        message = str(error["ctx"]["error"])
        return f"{source}: '{key}': {message}" if key else f"{source}: {message}"
    value = error.get("input")
    return f"{source}: '{key}': {error['msg']} (got {value!r})"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-parsed mapping; raises :class:`ParamsError` naming the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(
            f"{source}: expected a mapping of stage sections, got {type(raw).__name__}"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        # A default computed from other keys (prepare.modality) is skipped, and reported,
        # when another key failed: only that other key is the user's problem.
        details = [
            detail for detail in error.errors() if detail["type"] != "default_factory_not_called"
        ]
        message = _describe(details[0], source)
        if len(details) > 1:
            message += f" (and {len(details) - 1} more problem(s))"
        raise ParamsError(message) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; every problem is one :class:`ParamsError` line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise ParamsError(
            f"{path}: not valid UTF-8 ({error.reason} at byte {error.start})"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # One line: some YAML errors (a control character) span two.
        problem = " ".join(str(getattr(error, "problem", None) or error).split())
        raise ParamsError(f"{path}: not valid YAML{where}: {problem}") from None
    return parse_params(raw, source=str(path))
