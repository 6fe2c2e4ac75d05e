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
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tlflax.errors import InputError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]


class ParamsError(InputError):
    """A ``params.yaml`` that cannot be used; the message names the file and key."""


class _Section(BaseModel):
    # extra="forbid" is what turns a typo into an error instead of a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True)


Modality = Literal["image", "text"]
NonEmptyString = Annotated[str, Field(min_length=1)]
# The sources `prepare` reads by name, and the kind of input each holds; the backbone must
# take the same kind. A TFDS catalog source (`tfds:<name>`) says its kind in
# `prepare.modality`: finding it in the catalog would make every params load import TFDS.
DATASET_MODALITY: dict[str, Modality] = {
    "fashion_mnist": "image",
    "fine_foods": "text",
    "image_folder": "image",
    "text_file": "text",
}
TFDS_PREFIX = "tfds:"
# tfds:<name>[/<config>][:<version>] as the TFDS catalog spells them (tfds:beans,
# tfds:imdb_reviews/plain_text:1.0.0); nothing that could reach outside a folder.
TFDS_DATASET_PATTERN = re.compile(
    r"^tfds:[a-z][a-z0-9_]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?(:[0-9]+\.[0-9]+\.[0-9]+)?$"
)
_IMAGE_SOURCE_KEYS = frozenset({"image_size", "channels", "max_pixels"})
_TEXT_FILE_KEYS = frozenset({"text_column", "label_column", "classes"})
_TFDS_KEYS = frozenset({"modality", "train_split", "test_split", "download"})
# Keys of `prepare` that only some sources read; any other source refuses them.
_SOURCE_SPECIFIC_KEYS = _IMAGE_SOURCE_KEYS | _TEXT_FILE_KEYS | _TFDS_KEYS | {"test_fraction"}


class PrepareParams(_Section):
    """Raw data → TFDS dataset: seeded, stratified train and validation subsets; test whole.

    Each subset's size is a count per class or a fraction of each class (give one, set the
    other to null); train is drawn from what validation left (``train_fraction: 1.0``, or
    both train sizes null, takes all of it). ``deduplicate`` drops training-pool records
    that repeat an earlier one or appear in test, before either subset is drawn.

    ``dataset`` names the source, ``raw_dir`` where it is:

    - ``fashion_mnist``, ``fine_foods``: the packaged datasets (``make assets``).
    - ``image_folder``: ``raw_dir/<class>/<image>`` (PNG, JPEG, BMP, GIF), or
      ``raw_dir/{train,test}/<class>/<image>``; read with ``image_size``, ``channels``
      and ``max_pixels``.
    - ``text_file``: one CSV (with a header row) or JSONL file, or a folder holding
      ``{train,test}.{csv,jsonl}``; read with ``text_column``, ``label_column`` and,
      optionally, ``classes``.
    - ``tfds:<name>[/<config>][:<version>]``: a TFDS catalog dataset, prepared as
      ``array_record`` in the TFDS data dir ``raw_dir``. ``modality`` says whether it
      holds images or texts, ``train_split`` / ``test_split`` which TFDS splits (or
      slices) to read, and ``download: true`` allows downloading it (needs a network).

    A source without a test split of its own (one image folder, one text file, a TFDS
    dataset with ``test_split: null``) gets one with ``test_fraction``: that share of
    each class, drawn with ``seed`` before validation and train, so runs with other
    subset sizes are tested on the same examples. Class names come from the source.
    Keys a source does not read are refused.
    """

    dataset: str = "fashion_mnist"
    raw_dir: str = "data/raw/fashion-mnist"
    train_per_class: PositiveInt | None = 100
    train_fraction: Annotated[float, Field(gt=0, le=1)] | None = None
    validation_per_class: PositiveInt | None = 20
    validation_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    deduplicate: bool = False
    seed: NonNegativeInt = 0
    # A source without a test split: hold out this share of each class as test.
    test_fraction: Annotated[float, Field(gt=0, lt=1)] | None = None
    # Image sources: every image is stored at image_size x image_size (None keeps the
    # images' own size, which must then be one size) with 1 or 3 channels. The backbone
    # sees extract.image_size, whatever size is stored.
    image_size: Annotated[int, Field(ge=8, le=1024)] | None = None
    channels: Literal[1, 3] = 3
    # Largest image accepted, in pixels (a decompression-bomb guard); None: the reader's
    # default, 8192 x 8192.
    max_pixels: PositiveInt | None = None
    # text_file: the column (CSV) or key (JSONL) of each text and of its label, and the
    # label names in label-id order (None: the sorted distinct labels found).
    text_column: NonEmptyString = "text"
    label_column: NonEmptyString = "label"
    classes: Annotated[list[NonEmptyString], Field(min_length=2)] | None = None
    # tfds: sources. The other sources imply their modality (filled in from the dataset).
    modality: Modality | None = Field(
        default_factory=lambda fields: DATASET_MODALITY.get(fields.get("dataset"))
    )
    # TFDS split expressions: "train", "train[:80%]", "train+validation".
    train_split: NonEmptyString = "train"
    test_split: NonEmptyString | None = "test"
    download: bool = False

    @field_validator("dataset")
    @classmethod
    def _known_source(cls, dataset: str) -> str:
        if dataset in DATASET_MODALITY:
            return dataset
        if dataset.startswith(TFDS_PREFIX):
            if not TFDS_DATASET_PATTERN.match(dataset):
                raise ValueError(
                    f"{dataset!r} is not a TFDS catalog name: expected "
                    "tfds:<name>[/<config>][:<version>], the name in lowercase snake_case, "
                    "e.g. tfds:beans or tfds:imdb_reviews/plain_text:1.0.0"
                )
            return dataset
        nearest = difflib.get_close_matches(dataset, list(DATASET_MODALITY), n=1, cutoff=0.5)
        hint = f"did you mean '{nearest[0]}'? " if nearest else ""
        raise ValueError(
            f"unknown dataset {dataset!r} ({hint}valid: {', '.join(DATASET_MODALITY)}, "
            f"or {TFDS_PREFIX}<catalog name>)"
        )

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

    @model_validator(mode="after")
    def _keys_fit_the_source(self) -> PrepareParams:
        packaged = self.dataset in ("fashion_mnist", "fine_foods")
        if self.catalog_name is not None and self.modality is None:
            raise ValueError(
                f"dataset '{self.dataset}' needs 'modality': image or text, the kind of "
                "input it holds"
            )
        if not packaged and "raw_dir" not in self.model_fields_set:
            raise ValueError(f"dataset '{self.dataset}' needs 'raw_dir': where to read it")
        unread = (self.model_fields_set & _SOURCE_SPECIFIC_KEYS) - self._keys_read_by_source()
        if unread:
            kind = f" ({self.modality} data)" if self.catalog_name is not None else ""
            raise ValueError(
                f"'{min(unread)}' does not apply to dataset '{self.dataset}'{kind}; remove it"
            )
        if self.catalog_name is not None and (self.test_split is None) == (
            self.test_fraction is None
        ):
            raise ValueError(
                "give exactly one of test_split and test_fraction (test_split: null holds "
                "out test_fraction of train_split as test)"
            )
        if self.text_column == self.label_column:
            raise ValueError(
                f"text_column and label_column are both {self.text_column!r}; they must differ"
            )
        if self.classes is not None and len(set(self.classes)) < len(self.classes):
            repeated = next(name for name in self.classes if self.classes.count(name) > 1)
            raise ValueError(f"classes lists {repeated!r} more than once")
        return self

    def _keys_read_by_source(self) -> frozenset[str]:
        """The source-specific keys that ``dataset`` reads."""
        if self.dataset == "image_folder":
            return _IMAGE_SOURCE_KEYS | {"test_fraction"}
        if self.dataset == "text_file":
            return _TEXT_FILE_KEYS | {"test_fraction"}
        if self.catalog_name is not None:
            image_keys = _IMAGE_SOURCE_KEYS if self.modality == "image" else frozenset()
            return _TFDS_KEYS | image_keys | {"test_fraction"}
        return frozenset()

    @property
    def catalog_name(self) -> str | None:
        """The TFDS catalog name of a ``tfds:`` source (``tfds:beans`` -> ``beans``), else None."""
        if self.dataset.startswith(TFDS_PREFIX):
            return self.dataset.removeprefix(TFDS_PREFIX)
        return None

    @property
    def stored_name(self) -> str:
        """The prepared dataset's TFDS name (its folder in ``data/<experiment>/tfds``).

        Lowercase snake_case, safe as a file name: the dataset itself for the named sources,
        ``tfds_imdb_reviews_plain_text_1_0_0`` for ``tfds:imdb_reviews/plain_text:1.0.0``.
        """
        return re.sub(r"[^a-z0-9]+", "_", self.dataset.lower()).strip("_")


class ValidateParams(_Section):
    """Great Expectations thresholds; a critical failure stops the pipeline."""

    max_label_kl_divergence: NonNegativeFloat = 0.05
    max_class_ratio: Annotated[float, Field(ge=1)] = 1.5
    min_examples_per_class: PositiveInt = 10
    max_split_kl_divergence: NonNegativeFloat = 0.1
    # Below 1, as ValidationThresholds requires: checked here, where the key can be named.
    max_duplicate_fraction: Probability = 0.01
    max_leakage_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Relative shift of each per-record feature's mean from train's: pixel intensity mean
    # and spread for images, characters and tokens for text.
    max_feature_mean_shift: NonNegativeFloat = 0.15
    # Expected label distribution, one weight per class in label order; null means uniform.
    expected_class_weights: list[PositiveFloat] | None = None


class BaselineParams(_Section):
    """The classical scikit-learn reference (tlflax.baseline), fitted on train alone.

    Its model and hyperparameters are chosen by stratified ``cv_folds``-fold
    cross-validation on the training split, whose folds ``seed`` shuffles.
    """

    cv_folds: Annotated[int, Field(ge=2, le=20)] = 3
    seed: NonNegativeInt = 0


class ExtractParams(_Section):
    """The frozen pretrained backbone and the input size it sees (images or tokens)."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: Annotated[int, Field(ge=32, le=512)] = 64
    # Every text is padded or truncated to this many WordPiece tokens ([CLS] and [SEP]
    # included): one fixed shape, so every jitted function compiles once.
    max_length: Annotated[int, Field(ge=8, le=512)] = 128
    batch_size: PositiveInt = 128
    # Which depths the head reads (tlflax/taps.py): "auto", the depths the advise stage
    # picks from its probes; "last", the backbone's final pooled features; or a list of
    # layer-group counts, e.g. [7, 13, 14]. With taps the network is cut at the highest.
    taps: Literal["auto", "last"] | Annotated[list[PositiveInt], Field(min_length=1)] = "auto"

    @field_validator("taps")
    @classmethod
    def _taps_increase(cls, taps: str | list[int]) -> str | list[int]:
        if isinstance(taps, list) and any(b <= a for a, b in zip(taps, taps[1:], strict=False)):
            raise ValueError(f"list the depths in increasing order, each once (got {taps})")
        return taps


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
    # Test-time augmentation: validation and test predictions average the class
    # probabilities of each image and its mirror image (images only).
    test_time_flip: bool = False


Strategy = Literal["auto", "feature_extraction", "top_k", "full", "scratch"]


class FinetuneParams(_Section):
    """Backbone + trained head, unfrozen by rules, with per-group learning rates.

    ``strategy`` says what trains: ``feature_extraction`` (the head alone), ``top_k`` (the
    top ``unfreeze_groups`` backbone layer groups and the head), ``full``, ``scratch``
    (random weights), or ``auto``: the advise stage's pick. Explicit ``rules`` (only with
    ``auto``) win over the advised strategy. The defaults below are what the library uses
    when called directly; the pipeline's finetune stage fills the advised keys - ``rules``,
    ``epochs``, ``warmup_fraction``, ``layer_lr_decay`` - that ``params.yaml`` leaves unset
    (absent, or null) from the advice (:func:`tlflax.advisor.apply_advice`).
    """

    strategy: Strategy = "auto"
    # top_k: how many backbone layer groups, counted from the top, train.
    unfreeze_groups: PositiveInt | None = None
    learning_rate: PositiveFloat = 1e-3
    batch_size: PositiveInt = 32
    epochs: PositiveInt | None = 6
    warmup_fraction: Annotated[float, Field(ge=0, lt=1)] | None = 0.1
    weight_decay: NonNegativeFloat = 1e-4
    gradient_clip_norm: PositiveFloat = 1.0
    layer_lr_decay: Annotated[float, Field(gt=0, le=1)] | None = 0.8
    # Share of each target's probability spread evenly over all classes (0: none).
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # Decay of an exponential moving average of the trained weights, validated and saved in
    # their place (0: none); warmed up as TensorFlow's ExponentialMovingAverage.
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    # ULMFiT's gradual unfreezing: the head trains from epoch 0, then one more layer group
    # from the top joins per epoch (the step still compiles once: later groups wait at lr 0).
    gradual_unfreezing: bool = False
    batchnorm: Literal["frozen", "train"] = "frozen"
    # Which validation metric picks the best epoch (the saved model) and runs out patience.
    # On a small validation set the loss can stall while accuracy still climbs (the loss
    # also pays for confident mistakes); accuracy ties keep the earlier epoch.
    monitor: Literal["validation_loss", "validation_accuracy"] = "validation_loss"
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
    rules: Annotated[list[TransferRule], Field(min_length=1)] | None = Field(
        default_factory=lambda: [
            TransferRule(pattern="^head/"),
            TransferRule(pattern="^backbone/", lr_multiplier=1.0),
        ],
    )
    seed: NonNegativeInt = 0

    def is_explicit(self, key: str) -> bool:
        """Whether ``params.yaml`` gave ``key`` a value (null counts as unset)."""
        return key in self.model_fields_set and getattr(self, key) is not None

    @model_validator(mode="after")
    def _strategy_settings_agree(self) -> FinetuneParams:
        if self.unfreeze_groups is not None and self.strategy != "top_k":
            raise ValueError(
                f"'unfreeze_groups' applies to strategy 'top_k' only (strategy is "
                f"'{self.strategy}'); set strategy: top_k or remove it"
            )
        if self.is_explicit("rules") and self.strategy != "auto":
            raise ValueError(
                f"'rules' and strategy '{self.strategy}' both say which parameters train; "
                "keep one (with strategy: auto, explicit rules win over the advice)"
            )
        return self


class AdviseParams(_Section):
    """The strategy advisor: linear probes of the frozen backbone at every depth.

    The thresholds of its decision rules are named here, so every recommendation can be
    traced to a number in the report (tlflax/advisor.py explains each rule).
    """

    # Probing cost: at most this many training examples (a stratified subset) are embedded;
    # the validation split is used whole.
    max_train_examples: PositiveInt = 2000
    # extract.taps: auto picks the head's depths by greedy forward selection on the leave-
    # one-out accuracy of a ridge probe on the probed training examples (validation only
    # scores the result): a depth joins while it adds at least min_tap_gain, up to max_taps.
    max_taps: PositiveInt = 8
    min_tap_gain: Probability = 0.002
    # Dataset-size regimes, in training examples of the rarest class: below
    # small_data_per_class is "small"; from large_data_per_class on, "large" (training from
    # scratch becomes a candidate, and random-init features are probed as its reference).
    small_data_per_class: PositiveInt = 100
    large_data_per_class: PositiveInt = 2000
    # A depth whose probe accuracy is within this of the best depth's counts as reaching it
    # (plateau; the top group: high similarity).
    plateau_tolerance: Probability = 0.01
    # With large data, train from scratch unless pretrained features beat random-init ones
    # by more than this (validation accuracy of the best depth of each).
    min_pretraining_gain: Probability = 0.02
    # A difference between two probes (a depth vs the best, pretrained vs random init) is
    # real only when it exceeds its threshold above AND McNemar's paired test (two-sided
    # mid-p) rejects equal accuracy at this level. All probes are scored on the same
    # validation examples, so only the examples the two classify differently decide; the
    # standard error of one accuracy would ignore that pairing.
    significance: Annotated[float, Field(gt=0, lt=1)] = 0.05


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
    baseline: BaselineParams = BaselineParams()
    extract: ExtractParams = ExtractParams()
    train_head: TrainHeadParams = TrainHeadParams()
    advise: AdviseParams = AdviseParams()
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
        augment = finetune.augment
        augmented = augment.random_crop or augment.flip or augment.test_time_flip
        if (
            modality == "image"
            and finetune.cache_frozen_prefix
            and (augmented or finetune.batchnorm == "train")
        ):
            raise ValueError(
                "'finetune.cache_frozen_prefix' needs finetune.augment off (random_crop, "
                "flip and test_time_flip false) and finetune.batchnorm 'frozen': both change "
                "the frozen layers' outputs from step to step"
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
