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


Modality = Literal["image", "text"]
# What each dataset `prepare` can read holds; the backbone must take the same kind of input.
DATASET_MODALITY: dict[str, Modality] = {"fashion_mnist": "image", "fine_foods": "text"}


class PrepareParams(_Section):
    """Raw data → TFDS dataset: seeded, stratified train and validation subsets; test whole.

    Each subset's size is a count per class or a fraction of each class (give one, set the
    other to null); train is drawn from what validation left (``train_fraction: 1.0``, or
    both train sizes null, takes all of it). ``deduplicate`` drops training-pool records
    that repeat an earlier one or appear in test, before either subset is drawn.
    """

    dataset: Literal["fashion_mnist", "fine_foods"] = "fashion_mnist"
    raw_dir: str = "data/raw/fashion-mnist"
    train_per_class: PositiveInt | None = 100
    train_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    validation_per_class: PositiveInt | None = 20
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    deduplicate: bool = False
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _one_size_per_subset(self) -> PrepareParams:
        if self.train_per_class is not None and self.train_fraction is not None:
            raise ValueError(
                "give train_per_class or train_fraction, not both (set the other to null)"
            )
        if (self.validation_per_class is None) == (self.validation_fraction is None):
            raise ValueError(
                "give exactly one of validation_per_class and validation_fraction "
                "(set the other to null)"
            )
        return self

    @property
    def modality(self) -> Modality:
        return DATASET_MODALITY[self.dataset]


class ValidateParams(_Section):
    """Great Expectations thresholds; a critical failure stops the pipeline."""

    max_label_kl_divergence: NonNegativeFloat = 0.05
    max_class_ratio: Annotated[float, Field(ge=1)] = 1.5
    min_examples_per_class: PositiveInt = 10
    max_split_kl_divergence: NonNegativeFloat = 0.1
    max_duplicate_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_leakage_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Relative shift of each per-record feature's mean from train's: pixel intensity mean
    # and spread for images, characters and tokens for text.
    max_feature_mean_shift: NonNegativeFloat = 0.15
    # Expected label distribution, one weight per class in label order; null means uniform.
    expected_class_weights: list[PositiveFloat] | None = None


class ExtractParams(_Section):
    """The frozen pretrained backbone and the input size it sees (images or tokens)."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: Annotated[int, Field(ge=32, le=512)] = 64
    # Every text is padded or truncated to this many WordPiece tokens ([CLS] and [SEP]
    # included): one fixed shape, so every jitted function compiles once.
    max_length: Annotated[int, Field(ge=8, le=512)] = 128
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
    # ULMFiT's gradual unfreezing: the head trains from epoch 0, then one more layer group
    # from the top joins per epoch (the step still compiles once: later groups wait at lr 0).
    gradual_unfreezing: bool = False
    batchnorm: Literal["frozen", "train"] = "frozen"
    patience: PositiveInt = 3
    keep_best_checkpoints: PositiveInt = 2
    augment: AugmentParams = AugmentParams()
    # Run the fully frozen bottom layer groups once, in inference mode, and train the rest
    # from their cached outputs: a step then costs only the layers that train. Needs
    # outputs that do not change from step to step: no image augmentation, frozen BatchNorm.
    cache_frozen_prefix: bool = False
    # bfloat16 compute with float32 master weights: for accelerators (GPU/TPU); on CPU it is
    # slower than float32 and only useful to check that a run fits.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    rules: list[TransferRule] = Field(
        default_factory=lambda: [
            TransferRule(pattern="^head/"),
            TransferRule(pattern="^backbone/", lr_multiplier=1.0),
        ],
        min_length=1,
    )
    seed: NonNegativeInt = 0


class TrainScratchParams(_Section):
    """The from-scratch baseline: the same architecture, random init, the same data and epochs.

    Everything trains, BatchNorm included (random statistics cannot stay frozen), at a
    learning rate suited to random weights rather than to gentle fine-tuning.
    """

    learning_rate: PositiveFloat = 3e-3
    batch_size: PositiveInt = 32
    weight_decay: NonNegativeFloat = 1e-4
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
    train_scratch: TrainScratchParams = TrainScratchParams()
    evaluate: EvaluateParams = EvaluateParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def validate_params(self) -> ValidateParams:
        return self.validate_

    @model_validator(mode="after")
    def _keys_fit_the_modality(self) -> Params:
        # A key of the other modality would be silently ignored; say so instead. (Whether
        # extract.backbone takes this modality is checked where the backbone registry is
        # loaded: importing the models here would make every params load import JAX.)
        modality = self.prepare.modality
        other_modality_keys = {
            "image": [("extract", self.extract, "max_length")],
            "text": [
                ("extract", self.extract, "image_size"),
                ("finetune", self.finetune, "augment"),
                ("finetune", self.finetune, "batchnorm"),
            ],
        }[modality]
        for section_name, section, key in other_modality_keys:
            if key in section.model_fields_set:
                raise ValueError(
                    f"'{section_name}.{key}' does not apply to prepare.dataset "
                    f"'{self.prepare.dataset}' ({modality} data); remove it"
                )
        finetune = self.finetune
        augmented = finetune.augment.random_crop or finetune.augment.flip
        if (
            modality == "image"
            and finetune.cache_frozen_prefix
            and (augmented or finetune.batchnorm == "train")
        ):
            raise ValueError(
                "'finetune.cache_frozen_prefix' needs finetune.augment off (random_crop and "
                "flip false) and finetune.batchnorm 'frozen': both change the frozen layers' "
                "outputs from step to step"
            )
        return self


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
