"""Stage ``prepare``: raw files → a TFDS dataset with train / validation / test splits.

The seeds' "small dataset" scenario: train is a seeded, stratified subset of the original
training split (N per class, or a fraction of each class), validation a disjoint subset of
it (for early stopping), and test the full original test split. With
``prepare.deduplicate``, training-pool records that repeat an earlier one or also occur in
test are dropped first, so neither train nor validation holds a copy of another record or
of a test record (test itself is left whole, comparable with published results).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.config import Params, PrepareParams
from tlflax.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from tlflax.data.fine_foods import FINE_FOODS_CLASSES, read_fine_foods
from tlflax.data.manifest import (
    content_hash,
    duplicate_records,
    image_manifest,
    text_content_hash,
    text_manifest,
)
from tlflax.data.subsets import stratified_subset
from tlflax.data.tfds_store import write_image_dataset
from tlflax.data.tfds_text import write_text_dataset
from tlflax.io import atomic_path
from tlflax.text import count_tokens

# (records, integer labels): uint8 images (N, H, W, C), or texts as an object array (N,).
Split = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class RawDataset:
    """A dataset as its source ships it: a training pool to subset, and a test split."""

    class_names: list[str]
    pool: Split
    test: Split


def _read_fashion_mnist(raw_dir: Path) -> RawDataset:
    raw = read_fashion_mnist(raw_dir)
    return RawDataset(FASHION_MNIST_CLASSES, raw["train"], raw["test"])


def _read_fine_foods(raw_dir: Path) -> RawDataset:
    def split(frame: pd.DataFrame) -> Split:
        labels = frame["label"].map(FINE_FOODS_CLASSES.index).to_numpy(np.int64)
        return frame["review"].to_numpy(dtype=object), labels

    raw = read_fine_foods(raw_dir)
    return RawDataset(FINE_FOODS_CLASSES, split(raw["train"]), split(raw["test"]))


@dataclass(frozen=True)
class Storage:
    """How one modality's records are hashed, stored as TFDS and described in a manifest."""

    record_hash: Callable[[object], str]
    write: Callable[..., Path]
    manifest: Callable[[dict[str, Split], Sequence[str]], pd.DataFrame]


READERS: dict[str, Callable[[Path], RawDataset]] = {
    "fashion_mnist": _read_fashion_mnist,
    "fine_foods": _read_fine_foods,
}
STORAGE: dict[str, Storage] = {
    "image": Storage(content_hash, write_image_dataset, image_manifest),
    "text": Storage(
        text_content_hash,
        write_text_dataset,
        lambda splits, class_names: text_manifest(splits, class_names, count_tokens=count_tokens),
    ),
}


def _size(per_class: int | None, fraction: float | None) -> dict[str, int | float]:
    """stratified_subset's size argument; neither given means all available examples."""
    if per_class is not None:
        return {"per_class": per_class}
    return {"fraction": 1.0 if fraction is None else fraction}


def _describe(cfg: PrepareParams) -> str:
    """The dataset's description in dataset_info.json: how train was drawn."""
    if cfg.train_per_class is not None:
        subset = f"{cfg.train_per_class}/class"
    else:
        subset = f"{1.0 if cfg.train_fraction is None else cfg.train_fraction:g} of each class"
    deduplicated = ", deduplicated" if cfg.deduplicate else ""
    return f"{cfg.dataset}: {subset} train subset (seed {cfg.seed}){deduplicated}"


def prepare(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.prepare
    raw = READERS[cfg.dataset](Path(cfg.raw_dir))
    storage = STORAGE[cfg.modality]
    records, labels = raw.pool
    dropped = None
    if cfg.deduplicate:
        pool_hashes = [storage.record_hash(record) for record in records]
        test_hashes = [storage.record_hash(record) for record in raw.test[0]]
        dropped = np.flatnonzero(duplicate_records(pool_hashes, test_hashes))
        print(
            f"prepare: dropped {len(dropped)} training-pool records that repeat another "
            "record or occur in test"
        )
    # Validation first, and independent of the train size: runs that vary the training
    # subset are compared on the same validation examples.
    validation_index = stratified_subset(
        labels,
        **_size(cfg.validation_per_class, cfg.validation_fraction),
        seed=cfg.seed,
        exclude=dropped,
    )
    taken = validation_index if dropped is None else np.union1d(validation_index, dropped)
    train_index = stratified_subset(
        labels, **_size(cfg.train_per_class, cfg.train_fraction), seed=cfg.seed, exclude=taken
    )
    splits = {
        "train": (records[train_index], labels[train_index]),
        "validation": (records[validation_index], labels[validation_index]),
        "test": raw.test,
    }
    storage.write(
        paths.dataset_dir,
        cfg.dataset,
        splits,
        raw.class_names,
        description=_describe(cfg),
    )
    manifest = storage.manifest(splits, raw.class_names)
    with atomic_path(paths.manifest) as temporary:
        manifest.to_parquet(temporary, index=False)
    sizes = ", ".join(f"{name} {len(split[1])}" for name, split in splits.items())
    print(f"prepare: wrote {paths.dataset_dir} ({sizes})")


if __name__ == "__main__":
    run_stage("prepare", prepare)
