"""Cached features (the extract stage's ``.npz`` files) read back and checked before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlflax.data.errors import DataError
from tlflax.data.tfds_store import check_labels
from tlflax.io import read_arrays


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


def read_training_features(
    train_path: Path, validation_path: Path, num_classes: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The cached train and validation features (:func:`read_features`), of one width.

    Raises:
      DataError: as :func:`read_features`, or naming ``validation_path`` when its features
        have another number of dimensions than train's.
    """
    train = read_features(train_path, num_classes)
    validation = read_features(validation_path, num_classes)
    if validation["features"].shape[1] != train["features"].shape[1]:
        raise DataError(
            validation_path,
            f"features have {validation['features'].shape[1]} dimensions but {train_path} has "
            f"{train['features'].shape[1]}",
            "run the extract stage again",
        )
    return train, validation
