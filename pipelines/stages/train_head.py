"""Stage ``train_head``: feature extraction's second half - a new head on cached features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from pipelines.stages.common import ExperimentPaths, LiveLog, check_batch_fits, run_stage
from tlflax.checkpoint import save_tree
from tlflax.config import Params
from tlflax.data.errors import DataError
from tlflax.data.tfds_store import check_labels, read_class_names
from tlflax.io import atomic_path, read_arrays, write_json
from tlflax.train import create_head, train_head


def read_features(path: Path, num_classes: int) -> dict[str, np.ndarray]:
    """The cached features and labels of one split, checked before any training.

    Raises:
      DataError: naming ``path``: unreadable, an array missing or of the wrong shape, no
        examples, a label outside the classes, or a row holding NaN or Inf.
    """
    arrays = read_arrays(path, required=("features", "label"))
    features, labels = arrays["features"], arrays["label"]
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise DataError(
            path, f"'features' must be a float (N, D) array, got {features.dtype} {features.shape}"
        )
    if len(features) == 0:
        raise DataError(path, "holds no examples (an empty split)")
    check_labels(str(path), labels, len(features), num_classes)
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad_rows.size:
        raise DataError(
            path,
            f"{bad_rows.size} rows hold NaN or Inf features (the first is row {bad_rows[0]})",
            "run the extract stage again",
        )
    return {"features": features, "label": labels}


def run(params: Params, paths: ExperimentPaths) -> None:
    cfg = params.train_head
    class_names = read_class_names(paths.dataset_dir, params.prepare.stored_name)
    train_path, validation_path = paths.features / "train.npz", paths.features / "validation.npz"
    train = read_features(train_path, len(class_names))
    validation = read_features(validation_path, len(class_names))
    if validation["features"].shape[1] != train["features"].shape[1]:
        raise DataError(
            validation_path,
            f"features have {validation['features'].shape[1]} dimensions but {train_path} has "
            f"{train['features'].shape[1]}",
            "run the extract stage again",
        )
    check_batch_fits("train_head.batch_size", cfg.batch_size, train)
    head = create_head(train["features"].shape[1], len(class_names), cfg)
    epochs: list[dict[str, float]] = []
    live = LiveLog(paths.live("train_head"))

    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        epochs.append(metrics)  # the log as epochs end: progress shows while it trains
        live.update(epochs)

    history = train_head(head, train, validation, cfg, on_epoch_end=log_epoch)
    live.update(history.epochs, final=True)
    with atomic_path(paths.head, directory=True) as temporary:
        save_tree(temporary, nnx.state(head, nnx.Param))
    summary = history.summary()
    write_json(paths.metrics("train_head"), summary)
    print(
        f"train_head: best epoch {history.best_epoch} of {len(history.epochs)}, "
        f"validation accuracy {summary['validation_accuracy']:.4f}"
    )


if __name__ == "__main__":
    run_stage("train_head", run)
