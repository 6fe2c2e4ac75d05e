"""The data stages' sections of ``params.yaml``: ``prepare`` (the data sources) and ``validate``."""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

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

# The sources `prepare` reads by name, and the kind of input each holds; the backbone must
# take the same kind. A TFDS catalog source (`tfds:<name>`) says its kind in
# `prepare.modality`: finding it in the catalog would make every params load import TFDS.
DATASET_MODALITY: dict[str, Modality] = {
    "fashion_mnist": "image",
    "fine_foods": "text",
    "spoken_language": "audio",
    "image_folder": "image",
    "text_file": "text",
    "audio_folder": "audio",
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
_AUDIO_SOURCE_KEYS = frozenset({"sample_rate", "clip_seconds", "clip_align", "clip_padding"})
# audio_folder's lists name each clip's file in path_column, beside text_file's label keys.
_AUDIO_LIST_KEYS = frozenset({"path_column", "label_column", "classes"})
# Keys of `prepare` that only some sources read; any other source refuses them.
_SOURCE_SPECIFIC_KEYS = (
    _IMAGE_SOURCE_KEYS
    | _TEXT_FILE_KEYS
    | _TFDS_KEYS
    | _AUDIO_SOURCE_KEYS
    | _AUDIO_LIST_KEYS
    | {"test_fraction"}
)


class PrepareParams(StrictSection):
    """Raw data → TFDS dataset: seeded, stratified train and validation subsets; test whole.

    Each subset's size is a count per class or a fraction of each class (give one, set the
    other to null); train is drawn from what validation left (``train_fraction: 1.0``, or
    both train sizes null, takes all of it). ``deduplicate`` drops training-pool records
    that repeat an earlier one or appear in test, before either subset is drawn.

    ``dataset`` names the source, ``raw_dir`` where it is:

    - ``fashion_mnist``, ``fine_foods``: the packaged datasets (``make assets``).
    - ``spoken_language``: the packaged Asterisk voice prompts, ``raw_dir/<language>/``
      (``data/raw/asterisk``: en, es, fr, it, ru); no test split of its own, so it needs
      ``test_fraction``. Read with ``sample_rate``, ``clip_seconds``, ``clip_align`` and
      ``clip_padding``.
    - ``image_folder``: ``raw_dir/<class>/<image>`` (PNG, JPEG, BMP, GIF), or
      ``raw_dir/{train,test}/<class>/<image>``; read with ``image_size``, ``channels``
      and ``max_pixels``.
    - ``text_file``: one CSV (with a header row) or JSONL file, or a folder holding
      ``{train,test}.{csv,jsonl}``; read with ``text_column``, ``label_column`` and,
      optionally, ``classes``.
    - ``audio_folder``: ``raw_dir/<class>/[<sub-folders>/]<clip>`` (WAV, FLAC, AIFF), a
      CSV or JSONL list of clips (``path_column``: the file, relative to the list's folder;
      ``label_column``; optionally ``classes``), or ``raw_dir/{train,test}`` holding either;
      every clip brought to ``sample_rate`` and ``clip_seconds`` (``clip_align``,
      ``clip_padding``).
    - ``tfds:<name>[/<config>][:<version>]``: a TFDS catalog dataset, prepared as
      ``array_record`` in the TFDS data dir ``raw_dir``. ``modality`` says whether it
      holds images or texts, ``train_split`` / ``test_split`` which TFDS splits (or
      slices) to read, and ``download: true`` allows downloading it (needs a network).

    A source without a test split of its own (one image or audio folder, one text file or
    audio list, ``spoken_language``, a TFDS dataset with ``test_split: null``) gets one
    with ``test_fraction``: that share of each class, drawn with ``seed`` before
    validation and train, so runs with other subset sizes are tested on the same examples.
    Class names come from the source.
    Keys a source does not read are refused.
    """

    dataset: str = "fashion_mnist"
    raw_dir: str = "data/raw/fashion-mnist"
    train_per_class: PositiveInt | None = 100
    # A long tail (with train_per_class): class k of C draws train_per_class *
    # ratio ** (-k / (C - 1)) examples, rounded - geometric from train_per_class for the
    # first class in label order down to train_per_class / ratio for the last, as in
    # CIFAR-10-LT (Cui et al., 2019). Validation and test stay as they are.
    train_imbalance_ratio: Annotated[float, Field(ge=1)] | None = None
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
    # Audio sources: every clip is mixed to mono, resampled to sample_rate (Hz) and cropped
    # or padded (clip_padding) to clip_seconds; clip_align start keeps a long clip's
    # beginning and pads at the end (speech prompts and drum hits start at their onset),
    # centre crops and pads both ends. The defaults are the musicnn backbone's input: 3 s at 16 kHz.
    sample_rate: Annotated[int, Field(ge=8000, le=192000)] = 16000
    clip_seconds: Annotated[float, Field(ge=0.1, le=600)] = 3.0
    clip_align: Literal["start", "centre"] = "start"
    # What fills a clip shorter than clip_seconds: zeros (silence), or repeat (the clip
    # looped), which keeps time-pooled features from mixing the recording with silence in
    # proportions set by its length.
    clip_padding: Literal["zeros", "repeat"] = "zeros"
    # audio_folder lists: the column (CSV) or key (JSONL) naming each clip's file.
    path_column: NonEmptyString = "path"
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
        if self.train_imbalance_ratio is not None and self.train_per_class is None:
            raise ValueError(
                "'train_imbalance_ratio' needs train_per_class (the largest class's size)"
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
        if self.catalog_name is not None and self.modality == "audio":
            raise ValueError(
                f"'modality' audio does not apply to dataset '{self.dataset}': TFDS catalog "
                "audio is not read; export the clips and use dataset audio_folder"
            )
        if not packaged and "raw_dir" not in self.model_fields_set:
            # spoken_language is packaged too, but the default raw_dir is Fashion-MNIST's.
            where = " (make assets unpacks it to data/raw/asterisk)"
            raise ValueError(
                f"dataset '{self.dataset}' needs 'raw_dir': where to read it"
                + (where if self.dataset == "spoken_language" else "")
            )
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
        if self.dataset == "spoken_language" and self.test_fraction is None:
            raise ValueError(
                "dataset 'spoken_language' needs 'test_fraction': it ships no test split, "
                "so that share of each language is held out as test"
            )
        # The column read beside the labels: each clip's file for audio, each text otherwise.
        content_key = "path_column" if self.dataset == "audio_folder" else "text_column"
        if getattr(self, content_key) == self.label_column:
            raise ValueError(
                f"{content_key} and label_column are both {self.label_column!r}; they must differ"
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
        if self.dataset == "audio_folder":
            return _AUDIO_SOURCE_KEYS | _AUDIO_LIST_KEYS | {"test_fraction"}
        if self.dataset == "spoken_language":
            return _AUDIO_SOURCE_KEYS | {"test_fraction"}
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


class ValidateParams(StrictSection):
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
    # Audio: share of all clips that may be silent (below -60 dBFS), and the largest
    # share of one clip's samples at full scale (clipped by the recording chain).
    max_silent_fraction: Probability = 0.0
    max_clipped_fraction: Probability = 0.01
