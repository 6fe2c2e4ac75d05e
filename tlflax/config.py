"""Typed schema of ``params.yaml``.

Every hyperparameter the pipeline uses lives in ``params.yaml``; this module is the one place
that says which keys exist, their types and their ranges. Loading is strict: an unknown or
misspelled key, a wrong type or an out-of-range value stops with one message naming the key
(and the nearest valid key), before any work starts.

The library never reads ``params.yaml`` by itself: stage scripts call :func:`load_params`
and hand the typed sections to ``tlflax`` functions.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]


class ParamsError(ValueError):
    """A ``params.yaml`` that cannot be used; the message names the file and key."""


class _Section(BaseModel):
    # extra="forbid" is what turns a typo into an error instead of a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareParams(_Section):
    """Raw data → TFDS dataset, with the seeds' "small dataset" subset of train."""

    dataset: Literal["fashion_mnist"] = "fashion_mnist"
    raw_dir: str = "data/raw/fashion-mnist"
    train_per_class: PositiveInt = 100
    validation_per_class: PositiveInt = 20
    seed: NonNegativeInt = 0


class ValidateParams(_Section):
    """Great Expectations thresholds; a critical failure stops the pipeline."""

    max_label_kl_divergence: NonNegativeFloat = 0.05
    max_class_ratio: Annotated[float, Field(ge=1)] = 1.5
    min_examples_per_class: PositiveInt = 10
    max_split_kl_divergence: NonNegativeFloat = 0.1
    max_duplicate_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_mean_intensity_shift: NonNegativeFloat = 0.15


class ExtractParams(_Section):
    """The frozen pretrained backbone and the input resolution it sees."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: Annotated[int, Field(ge=32, le=512)] = 64
    batch_size: PositiveInt = 128


class TrainHeadParams(_Section):
    """New head trained on cached backbone features (feature extraction)."""

    head: Literal["linear", "mlp"] = "linear"
    hidden_dim: PositiveInt = 256
    dropout: Probability = 0.2
    learning_rate: PositiveFloat = 1e-2
    weight_decay: NonNegativeFloat = 1e-4
    batch_size: PositiveInt = 128
    max_epochs: PositiveInt = 200
    patience: PositiveInt = 20
    seed: NonNegativeInt = 0


class TransferRule(_Section):
    """One ordered rule over '/'-joined parameter paths; the first matching rule wins."""

    pattern: str
    freeze: bool = False
    lr_multiplier: NonNegativeFloat = 1.0
    weight_decay_multiplier: NonNegativeFloat = 1.0

    @model_validator(mode="after")
    def _pattern_compiles(self) -> TransferRule:
        import re

        try:
            re.compile(self.pattern)
        except re.error as error:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {error}") from None
        return self


class AugmentParams(_Section):
    random_crop: bool = True
    flip: bool = True


class FinetuneParams(_Section):
    """Backbone + trained head, unfrozen by rules, with per-group learning rates."""

    learning_rate: PositiveFloat = 1e-3
    batch_size: PositiveInt = 32
    epochs: PositiveInt = 6
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    weight_decay: NonNegativeFloat = 1e-4
    gradient_clip_norm: PositiveFloat = 1.0
    layer_lr_decay: Annotated[float, Field(gt=0, le=1)] = 0.8
    batchnorm: Literal["frozen", "train"] = "frozen"
    patience: PositiveInt = 3
    keep_best_checkpoints: PositiveInt = 2
    augment: AugmentParams = AugmentParams()
    rules: list[TransferRule] = Field(
        default_factory=lambda: [
            TransferRule(pattern="^head/"),
            TransferRule(pattern="^backbone/", lr_multiplier=1.0),
        ],
        min_length=1,
    )
    seed: NonNegativeInt = 0


class EvaluateParams(_Section):
    batch_size: PositiveInt = 256
    calibration_bins: Annotated[int, Field(ge=2, le=100)] = 15


class Params(_Section):
    """The whole ``params.yaml``: one section per stage (stage name = script name = section)."""

    experiment: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*$")] = "vision"
    prepare: PrepareParams = PrepareParams()
    validate_: ValidateParams = Field(default=ValidateParams(), alias="validate")
    extract: ExtractParams = ExtractParams()
    train_head: TrainHeadParams = TrainHeadParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def validate_params(self) -> ValidateParams:
        return self.validate_


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
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return model


def _describe(error: dict[str, Any], source: str) -> str:
    location = tuple(error["loc"])
    key = ".".join(str(part) for part in location)
    if error["type"] == "extra_forbidden":
        parent = _model_for(location[:-1])
        valid = [f.alias or name for name, f in parent.model_fields.items()] if parent else []
        nearest = difflib.get_close_matches(str(location[-1]), valid, n=1, cutoff=0.5)
        hint = (
            f" (did you mean '{nearest[0]}'?)" if nearest else f" (valid keys: {', '.join(valid)})"
        )
        return f"{source}: unknown key '{key}'{hint}"
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
        details = error.errors()
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
        raise ParamsError(
            f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}"
        ) from None
    return parse_params(raw, source=str(path))
