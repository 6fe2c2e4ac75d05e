"""Stage ``prepare``: raw files → a TFDS dataset with train / validation / test splits.

The seeds' "small dataset" scenario: train is a seeded, stratified N-per-class subset of the
original training split, validation a disjoint M-per-class subset of it (for early stopping),
and test the full original test split.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.stages.common import ExperimentPaths, run_stage
from tlflax.config import Params
from tlflax.data.fashion_mnist import FASHION_MNIST_CLASSES, read_fashion_mnist
from tlflax.data.manifest import image_manifest
from tlflax.data.subsets import split_train_validation
from tlflax.data.tfds_store import write_image_dataset
from tlflax.io import atomic_path


def prepare(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.prepare
    raw = read_fashion_mnist(Path(cfg.raw_dir))
    images, labels = raw["train"]
    train_index, validation_index = split_train_validation(
        labels,
        train_per_class=cfg.train_per_class,
        validation_per_class=cfg.validation_per_class,
        seed=cfg.seed,
    )
    splits = {
        "train": (images[train_index], labels[train_index]),
        "validation": (images[validation_index], labels[validation_index]),
        "test": raw["test"],
    }
    write_image_dataset(
        paths.dataset_dir,
        cfg.dataset,
        splits,
        FASHION_MNIST_CLASSES,
        description=f"{cfg.dataset}: {cfg.train_per_class}/class train subset (seed {cfg.seed})",
    )
    manifest = image_manifest(splits, FASHION_MNIST_CLASSES)
    with atomic_path(paths.manifest) as temporary:
        manifest.to_parquet(temporary, index=False)
    sizes = ", ".join(f"{name} {len(split[1])}" for name, split in splits.items())
    print(f"prepare: wrote {paths.dataset_dir} ({sizes})")


if __name__ == "__main__":
    run_stage("prepare", prepare)
