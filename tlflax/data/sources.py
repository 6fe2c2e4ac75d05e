"""A dataset source → a TFDS dataset with train / validation / test splits (stage ``prepare``).

The seeds' "small dataset" scenario: train is a seeded, stratified subset of the original
training split (N per class, or a fraction of each class), validation a disjoint subset of
it (for early stopping), and test the full original test split. With
``prepare.deduplicate``, training-pool records that repeat an earlier one or also occur in
test are dropped first, so neither train nor validation holds a copy of another record or
of a test record (test itself is left whole, comparable with published results).

Every source (``prepare.dataset``: the packaged datasets, ``image_folder``, ``text_file``,
``audio_folder``, ``tfds:<name>``) is read into one shape, a :class:`RawDataset`: class
names, a training pool and a test split. A source that has no test split of its own
(``spoken_language`` included) gets one from ``prepare.test_fraction``: that share of each
class, drawn with ``prepare.seed`` alone, so it stays put when the train or validation
sizes change. A validation split shipped with a user's folder is refused rather than
guessed at: validation is always drawn from the pool. Audio records are
:class:`~tlflax.data.audio_folder.AudioClips`: the clips with their facts, for the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tlflax.config import PrepareParams
from tlflax.data.audio_folder import (
    AudioClips,
    AudioDataset,
    ClipSettings,
    read_audio_folder,
    read_audio_list,
    read_audio_splits,
)
from tlflax.data.catalog import CatalogNotPreparedError, catalog_modality, read_tfds_catalog
from tlflax.data.errors import DataError
from tlflax.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from tlflax.data.fine_foods import FINE_FOODS_CLASSES, read_fine_foods
from tlflax.data.image_folder import read_image_folder, read_image_folder_splits
from tlflax.data.local_files import find_splits
from tlflax.data.manifest import (
    audio_content_hash,
    audio_manifest,
    content_hash,
    duplicate_records,
    image_manifest,
    text_content_hash,
    text_manifest,
)
from tlflax.data.spoken_language import read_spoken_language
from tlflax.data.subsets import long_tail_sizes, require_every_class, stratified_subset
from tlflax.data.text_file import TEXT_FILE_SUFFIXES, read_text_file, read_text_file_splits
from tlflax.data.tfds_audio import write_audio_dataset
from tlflax.data.tfds_store import write_image_dataset
from tlflax.data.tfds_text import write_text_dataset
from tlflax.text import count_tokens

# (records, integer labels): uint8 images (N, H, W, C), texts as an object array (N,), or
# audio clips (N, samples) with their facts.
Split = tuple[np.ndarray | AudioClips, np.ndarray]


@dataclass(frozen=True)
class RawDataset:
    """A dataset as its source ships it: a training pool to subset, and a test split."""

    class_names: list[str]
    pool: Split
    test: Split


def _read_fashion_mnist(cfg: PrepareParams) -> RawDataset:
    raw = read_fashion_mnist(Path(cfg.raw_dir))
    return RawDataset(FASHION_MNIST_CLASSES, raw["train"], raw["test"])


def _read_fine_foods(cfg: PrepareParams) -> RawDataset:
    def split(frame: pd.DataFrame) -> Split:
        labels = frame["label"].map(FINE_FOODS_CLASSES.index).to_numpy(np.int64)
        return frame["review"].to_numpy(dtype=object), labels

    raw = read_fine_foods(Path(cfg.raw_dir))
    return RawDataset(FINE_FOODS_CLASSES, split(raw["train"]), split(raw["test"]))


def _text_records(texts: Sequence[str]) -> np.ndarray:
    """Texts as a 1-D object array, indexable like the image arrays."""
    records = np.empty(len(texts), dtype=object)
    records[:] = list(texts)
    return records


def _hold_out_test(
    class_names: list[str], records: np.ndarray, labels: np.ndarray, cfg: PrepareParams
) -> RawDataset:
    """Split one labelled set into a training pool and a test split of ``test_fraction``.

    Stratified and seeded by ``prepare.seed`` alone; every class must keep at least one
    example on each side, or test (or training) would silently lack that class.
    """
    test_index = stratified_subset(labels, fraction=cfg.test_fraction, seed=cfg.seed)
    totals = np.bincount(labels, minlength=len(class_names))
    in_test = np.bincount(labels[test_index], minlength=len(class_names))
    for name, total, tested in zip(class_names, totals, in_test, strict=True):
        if total and (tested == 0 or tested == total):
            raise DataError(
                cfg.raw_dir,
                f"class {name!r} has {total} example(s): test_fraction {cfg.test_fraction:g} "
                f"leaves {tested} for test and {total - tested} for training",
                "add examples of it, or change prepare.test_fraction",
            )
    pool_index = np.setdiff1d(np.arange(len(labels)), test_index)
    return RawDataset(
        class_names,
        (records[pool_index], labels[pool_index]),
        (records[test_index], labels[test_index]),
    )


def _check_split_layout(root: Path, suffixes: Sequence[str], one_source: str) -> None:
    """Refuse a ``raw_dir`` without train and test splits, or with a validation split.

    ``one_source`` names what ``raw_dir`` holds without splits, for the hint that
    ``prepare.test_fraction`` reads it that way.
    """
    hint = f"or set prepare.test_fraction to hold out test from one {one_source}"
    if root.is_file():
        raise DataError(root, "is one file, without a test split", hint.removeprefix("or "))
    try:
        splits = find_splits(root, suffixes)
    except DataError as error:
        joined = hint if error.hint is None else f"{error.hint}; {hint}"
        raise DataError(error.location, error.problem, joined) from None
    if "validation" in splits:
        raise DataError(
            splits["validation"],
            "a validation split is not read: prepare draws validation from train "
            "(prepare.validation_per_class or validation_fraction)",
            "move its records into train, or remove it",
        )


def _image_options(cfg: PrepareParams) -> dict[str, int]:
    """The image reader's size, channel and pixel-limit arguments from params."""
    options = {"image_size": cfg.image_size, "channels": cfg.channels}
    if cfg.max_pixels is not None:
        options["max_pixels"] = cfg.max_pixels
    return options


def _read_image_folder(cfg: PrepareParams) -> RawDataset:
    root = Path(cfg.raw_dir)
    if cfg.test_fraction is not None:
        images, labels, class_names = read_image_folder(root, **_image_options(cfg))
        return _hold_out_test(class_names, images, labels, cfg)
    _check_split_layout(root, ("",), "folder of class folders")
    splits, class_names = read_image_folder_splits(root, **_image_options(cfg))
    return RawDataset(class_names, splits["train"], splits["test"])


def _read_text_file(cfg: PrepareParams) -> RawDataset:
    path = Path(cfg.raw_dir)
    columns = {
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "classes": cfg.classes,
    }
    if cfg.test_fraction is not None:
        texts, labels, class_names = read_text_file(path, **columns)
        return _hold_out_test(class_names, _text_records(texts), labels, cfg)
    _check_split_layout(path, TEXT_FILE_SUFFIXES, "CSV or JSONL file")
    splits, class_names = read_text_file_splits(path, **columns)
    texts, labels = splits["train"]
    test_texts, test_labels = splits["test"]
    return RawDataset(
        class_names, (_text_records(texts), labels), (_text_records(test_texts), test_labels)
    )


def _read_tfds_catalog(cfg: PrepareParams) -> RawDataset:
    data_dir = Path(cfg.raw_dir)
    # Checked from the dataset's description, before anything is downloaded or read.
    actual = catalog_modality(cfg.catalog_name, data_dir)
    if actual != cfg.modality:
        raise DataError(
            "prepare.modality",
            f"is {cfg.modality!r} but {cfg.dataset} holds {actual} data",
            f"set prepare.modality: {actual}",
        )
    splits = {"train": cfg.train_split}
    if cfg.test_split is not None:
        splits["test"] = cfg.test_split
    try:
        dataset = read_tfds_catalog(
            cfg.catalog_name,
            data_dir,
            splits=splits,
            download=cfg.download,
            **(_image_options(cfg) if actual == "image" else {}),
        )
    except CatalogNotPreparedError as error:
        # The reader speaks of its `download` argument; name the key that sets it here.
        raise DataError(
            error.location, error.problem, f"prepare.download is false; {error.hint}"
        ) from None

    def records(split: str) -> Split:
        inputs, labels = dataset.splits[split]
        return (inputs if actual == "image" else _text_records(inputs)), labels

    if cfg.test_fraction is not None:
        return _hold_out_test(dataset.class_names, *records("train"), cfg)
    return RawDataset(dataset.class_names, records("train"), records("test"))


def _clips(dataset: AudioDataset, settings: ClipSettings) -> Split:
    return AudioClips(dataset.waveforms, dataset.facts, settings.sample_rate), dataset.labels


def clip_settings(cfg: PrepareParams) -> ClipSettings:
    """The clip shape ``prepare`` stores audio in: what every reader of new clips must use."""
    return ClipSettings(cfg.sample_rate, cfg.clip_seconds, cfg.clip_align, cfg.clip_padding)


def _read_spoken_language(cfg: PrepareParams) -> RawDataset:
    settings = clip_settings(cfg)
    dataset = read_spoken_language(Path(cfg.raw_dir), settings)
    return _hold_out_test(dataset.class_names, *_clips(dataset, settings), cfg)


def _read_audio_folder(cfg: PrepareParams) -> RawDataset:
    """Class folders or a CSV/JSONL list (one, or one per split) of clips."""
    path, settings = Path(cfg.raw_dir), clip_settings(cfg)
    columns = {"path_column": cfg.path_column, "label_column": cfg.label_column}
    if cfg.test_fraction is not None:
        if path.suffix.lower() in TEXT_FILE_SUFFIXES:
            dataset = read_audio_list(path, settings, **columns, classes=cfg.classes)
        else:
            dataset = read_audio_folder(path, settings, classes=cfg.classes)
        return _hold_out_test(dataset.class_names, *_clips(dataset, settings), cfg)
    _check_split_layout(path, ("", *TEXT_FILE_SUFFIXES), "folder of class folders or list")
    splits = read_audio_splits(path, settings, **columns, classes=cfg.classes)
    train, test = splits["train"], splits["test"]
    return RawDataset(train.class_names, _clips(train, settings), _clips(test, settings))


READERS: dict[str, Callable[[PrepareParams], RawDataset]] = {
    "fashion_mnist": _read_fashion_mnist,
    "fine_foods": _read_fine_foods,
    "spoken_language": _read_spoken_language,
    "image_folder": _read_image_folder,
    "text_file": _read_text_file,
    "audio_folder": _read_audio_folder,
}


def read_source(cfg: PrepareParams) -> RawDataset:
    """The dataset ``prepare.dataset`` names, as pool + test with the source's class names."""
    if cfg.catalog_name is not None:
        return _read_tfds_catalog(cfg)
    return READERS[cfg.dataset](cfg)


@dataclass(frozen=True)
class Storage:
    """How one modality's records are hashed, stored as TFDS and described in a manifest."""

    record_hash: Callable[[object], str]
    write: Callable[..., Path]
    manifest: Callable[[dict[str, Split], Sequence[str]], pd.DataFrame]


def _write_audio(
    data_dir: Path, name: str, splits: dict[str, Split], class_names: Sequence[str], **kwargs
) -> Path:
    waveforms = {split: (clips.waveforms, labels) for split, (clips, labels) in splits.items()}
    sample_rate = splits["train"][0].sample_rate
    return write_audio_dataset(data_dir, name, waveforms, class_names, sample_rate, **kwargs)


def _audio_manifest(splits: dict[str, Split], class_names: Sequence[str]) -> pd.DataFrame:
    waveforms = {split: (clips.waveforms, labels) for split, (clips, labels) in splits.items()}
    facts = {split: clips.facts for split, (clips, _) in splits.items()}
    return audio_manifest(waveforms, facts, class_names)


STORAGE: dict[str, Storage] = {
    "image": Storage(content_hash, write_image_dataset, image_manifest),
    "text": Storage(
        text_content_hash,
        write_text_dataset,
        lambda splits, class_names: text_manifest(splits, class_names, count_tokens=count_tokens),
    ),
    "audio": Storage(audio_content_hash, _write_audio, _audio_manifest),
}


def _size(per_class: int | None, fraction: float | None) -> dict[str, int | float]:
    """stratified_subset's size argument; neither given means all available examples."""
    if per_class is not None:
        return {"per_class": per_class}
    return {"fraction": 1.0 if fraction is None else fraction}


def _describe(cfg: PrepareParams) -> str:
    """The dataset's description in dataset_info.json: how train (and test) were drawn."""
    if cfg.train_imbalance_ratio is not None:
        subset = f"long-tail {cfg.train_per_class}/class down by {cfg.train_imbalance_ratio:g}x"
    elif cfg.train_per_class is not None:
        subset = f"{cfg.train_per_class}/class"
    else:
        subset = f"{1.0 if cfg.train_fraction is None else cfg.train_fraction:g} of each class"
    deduplicated = ", deduplicated" if cfg.deduplicate else ""
    held_out = (
        f", test {cfg.test_fraction:g} of each class held out"
        if cfg.test_fraction is not None
        else ""
    )
    # Zero padding, the first and default, is left unsaid, as it always was.
    looped = ", short clips looped" if cfg.clip_padding == "repeat" else ""
    clips = (
        f", {cfg.clip_seconds:g} s clips at {cfg.sample_rate} Hz ({cfg.clip_align}{looped})"
        if cfg.modality == "audio"
        else ""
    )
    return f"{cfg.dataset}: {subset} train subset (seed {cfg.seed}){deduplicated}{held_out}{clips}"


def _train_size_keys(cfg: PrepareParams) -> str:
    """The params keys that size the training subset, for an error message."""
    if cfg.train_imbalance_ratio is not None:
        return "prepare.train_per_class / prepare.train_imbalance_ratio"
    return (
        "prepare.train_per_class" if cfg.train_per_class is not None else "prepare.train_fraction"
    )


@dataclass(frozen=True)
class PreparedDataset:
    """What :func:`prepare_dataset` wrote: the splits (records, labels) and class names."""

    splits: dict[str, Split]
    class_names: list[str]
    # Training-pool records left out as repeats of another record or of a test record.
    duplicates_dropped: int

    def manifest(self, modality: str) -> pd.DataFrame:
        """One row per record of every split (the validate stage's input)."""
        return STORAGE[modality].manifest(self.splits, self.class_names)


def prepare_dataset(cfg: PrepareParams, dataset_dir: Path) -> PreparedDataset:
    """Read ``cfg``'s source, draw train and validation, write the TFDS dataset.

    The dataset lands in ``dataset_dir`` (:mod:`tlflax.data.tfds_store`), where
    :func:`tlflax.tasks.task_for` reads it.

    Raises:
      DataError: the source is unreadable or its layout wrong (naming the file or key).
    """
    raw = read_source(cfg)
    storage = STORAGE[cfg.modality]
    records, labels = raw.pool
    dropped = None
    if cfg.deduplicate:
        pool_hashes = [storage.record_hash(record) for record in records]
        test_hashes = [storage.record_hash(record) for record in raw.test[0]]
        dropped = np.flatnonzero(duplicate_records(pool_hashes, test_hashes))
    # Validation first, and independent of the train size: runs that vary the training
    # subset are compared on the same validation examples.
    validation_index = stratified_subset(
        labels,
        **_size(cfg.validation_per_class, cfg.validation_fraction),
        seed=cfg.seed,
        exclude=dropped,
    )
    taken = validation_index if dropped is None else np.union1d(validation_index, dropped)
    train_size = _size(cfg.train_per_class, cfg.train_fraction)
    if cfg.train_imbalance_ratio is not None:
        train_size = {
            "per_class": long_tail_sizes(
                len(raw.class_names), cfg.train_per_class, cfg.train_imbalance_ratio
            )
        }
    train_index = stratified_subset(labels, **train_size, seed=cfg.seed, exclude=taken)
    require_every_class(labels[train_index], raw.class_names, size_keys=_train_size_keys(cfg))
    splits = {
        "train": (records[train_index], labels[train_index]),
        "validation": (records[validation_index], labels[validation_index]),
        "test": raw.test,
    }
    storage.write(dataset_dir, cfg.stored_name, splits, raw.class_names, description=_describe(cfg))
    return PreparedDataset(splits, raw.class_names, 0 if dropped is None else len(dropped))
