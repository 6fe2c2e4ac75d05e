"""What the strategy grid covers: its strategies, its datasets and each cell's data.

:mod:`pipelines.strategy_grid` trains every strategy on every cell defined here, and
:mod:`pipelines.strategy_grid_report` tabulates and plots the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlflax.data.fashion_mnist import read_fashion_mnist
from tlflax.data.fine_foods import FINE_FOODS_CLASSES, read_fine_foods
from tlflax.data.manifest import duplicate_records, text_content_hash
from tlflax.data.subsets import stratified_subset
from tlflax.tasks import Task

STRATEGIES = ("feature_extraction", "top_k", "full", "scratch")
# The test subset is drawn once, with this seed: every seed's models are scored on the same
# images, so the spread over seeds is the training draw's and the training run's alone.
TEST_SEED = 0


@dataclass(frozen=True)
class GridDataset:
    """One dataset of the grid: its pipeline params and its fixed evaluation subsets."""

    name: str
    params: dict[str, Any]
    validation_per_class: int
    test_examples: int


DATASETS = {
    "vision": GridDataset(
        "vision",
        {
            "experiment": "grid-vision",
            "prepare": {"dataset": "fashion_mnist", "raw_dir": "data/raw/fashion-mnist"},
            "extract": {"backbone": "efficientnet_lite0", "image_size": 32, "batch_size": 256},
            # No augmentation (fair to every strategy, and it lets frozen prefixes be cached).
            "finetune": {
                "learning_rate": 1e-3,
                "augment": {"random_crop": False, "flip": False},
                "cache_frozen_prefix": True,
                "keep_best_checkpoints": 1,
                # As the shipped jobs choose: on a few hundred validation examples the loss
                # swings and stalls while accuracy climbs, and the start (a head fitted to
                # this loss) would win every short run judged by it.
                "monitor": "validation_accuracy",
            },
            "train_scratch": {"learning_rate": 3e-3},
        },
        validation_per_class=50,
        test_examples=2000,
    ),
    "text": GridDataset(
        "text",
        {
            "experiment": "grid-text",
            "prepare": {"dataset": "fine_foods", "raw_dir": "data/raw/modeldata"},
            "extract": {"backbone": "minilm_l6", "max_length": 64, "batch_size": 64},
            "train_head": {"dropout": 0.1},
            # Batches of 16: a MiniLM step costs ~1 s here, the text budget is 150 of them.
            "finetune": {
                "learning_rate": 3e-4,
                "batch_size": 16,
                "weight_decay": 0.01,
                "cache_frozen_prefix": True,
                "keep_best_checkpoints": 1,
                "monitor": "validation_accuracy",
            },
            "train_scratch": {"learning_rate": 5e-4, "batch_size": 16, "weight_decay": 0.01},
        },
        validation_per_class=100,
        test_examples=1000,
    ),
}


# --------------------------------------------------------------------------------------------
# Data: the raw training pool, validation and a fixed test subset
# --------------------------------------------------------------------------------------------


def raw_splits(dataset: GridDataset) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    """(pool records, pool labels, test records, test labels) straight from the raw files."""
    raw_dir = Path(dataset.params["prepare"]["raw_dir"])
    if dataset.name == "vision":
        raw = read_fashion_mnist(raw_dir)
        return (*raw["train"], *raw["test"])
    frames = read_fine_foods(raw_dir)

    def split(frame):
        labels = frame["label"].map(FINE_FOODS_CLASSES.index).to_numpy(np.int64)
        return frame["review"].to_numpy(dtype=object), labels

    pool, pool_labels = split(frames["train"])
    test, test_labels = split(frames["test"])
    # As prepare's `deduplicate`: no repeated review in the pool, none that test also holds.
    drop = duplicate_records(
        [text_content_hash(t) for t in pool], [text_content_hash(t) for t in test]
    )
    return pool[~drop], pool_labels[~drop], test, test_labels


@dataclass
class CellData:
    train: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]
    test: dict[str, np.ndarray]


def cell_data(task: Task, dataset: GridDataset, per_class: int, raw, *, seed: int) -> CellData:
    """Train and validation drawn from the pool with ``seed`` (as ``prepare.seed`` draws
    them), test the fixed subset of :data:`TEST_SEED`."""
    pool, pool_labels, test, test_labels = raw
    validation_index = stratified_subset(
        pool_labels, per_class=dataset.validation_per_class, seed=seed
    )
    train_index = stratified_subset(
        pool_labels, per_class=per_class, seed=seed, exclude=validation_index
    )
    test_index = np.arange(len(test_labels))
    if dataset.test_examples < len(test_labels):
        fraction = dataset.test_examples / len(test_labels)
        test_index = stratified_subset(test_labels, fraction=fraction, seed=TEST_SEED)

    def inputs(records, labels, index):
        return {**task.model_inputs(records[index]), "label": labels[index]}

    return CellData(
        inputs(pool, pool_labels, train_index),
        inputs(pool, pool_labels, validation_index),
        inputs(test, test_labels, test_index),
    )
