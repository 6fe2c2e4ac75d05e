"""Manifests: one table row per example, the input of data validation.

Column contract. Every manifest has the :data:`COMMON_COLUMNS`
(``split, index, label, label_name, content_hash``); each modality adds its own
columns and describes them with a :class:`ManifestSchema`, which tells validation
which columns must exist, which give an example's size (0 = empty record), which one
is 0 for a constant record, and whose distributions must agree between splits.
A text manifest, for instance, would add ``text_length`` and a ``TEXT_MANIFEST_SCHEMA``
beside :data:`IMAGE_MANIFEST_SCHEMA`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tlflax.data.errors import DataError

COMMON_COLUMNS: tuple[str, ...] = ("split", "index", "label", "label_name", "content_hash")


@dataclass(frozen=True)
class ManifestSchema:
    """What validation needs to know about a modality's manifest columns.

    Attributes:
        columns: every column the manifest must have (common ones included).
        size_columns: columns that must be >= 1 for a non-empty record.
        variation_column: column that is 0 for a constant (blank) record, or None.
        distribution_columns: numeric features compared between splits.
    """

    columns: tuple[str, ...]
    size_columns: tuple[str, ...]
    variation_column: str | None
    distribution_columns: tuple[str, ...]


IMAGE_MANIFEST_SCHEMA = ManifestSchema(
    columns=(
        *COMMON_COLUMNS,
        "height",
        "width",
        "channels",
        "mean_intensity",
        "std_intensity",
    ),
    size_columns=("height", "width", "channels"),
    variation_column="std_intensity",
    distribution_columns=("mean_intensity", "std_intensity"),
)

# Rows per chunk for the pixel statistics: bounds the float64 temporaries to ~25 MB
# for 28x28 images instead of one copy of the whole split.
_STATISTICS_CHUNK_ROWS = 4096


def content_hash(record: np.ndarray) -> str:
    """SHA-1 of a record's raw bytes (C order): equal records, equal hashes, on any machine."""
    return hashlib.sha1(np.ascontiguousarray(record).tobytes()).hexdigest()


def _label_names(labels: np.ndarray, class_names: Sequence[str]) -> list[str | None]:
    # A label outside the class list gets no name instead of an exception: the manifest
    # exists to let validation report such records by split and index.
    return [class_names[label] if 0 <= label < len(class_names) else None for label in labels]


def _pixel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = images.reshape(len(images), -1)
    means = np.empty(len(images))
    stds = np.empty(len(images))
    for start in range(0, len(images), _STATISTICS_CHUNK_ROWS):
        chunk = flat[start : start + _STATISTICS_CHUNK_ROWS].astype(np.float64)
        means[start : start + len(chunk)] = chunk.mean(axis=1)
        stds[start : start + len(chunk)] = chunk.std(axis=1)
    return means, stds


def image_manifest(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str]
) -> pd.DataFrame:
    """Describe every image of every split, one row each.

    Args:
        splits: split name -> (images (N, H, W, C), integer labels (N,)).
        class_names: label ``i`` is ``class_names[i]``.

    Returns:
        A DataFrame with the columns of :data:`IMAGE_MANIFEST_SCHEMA`, in that order:
        split, index (position within the split), label, label_name (None when the
        label is out of range), content_hash (SHA-1 of the pixel bytes), height, width,
        channels, and mean_intensity / std_intensity in pixel units of the stored dtype.

    Raises:
        DataError: naming the split whose images are not 4-D or whose label count differs.
    """
    frames = []
    for split, (images, labels) in splits.items():
        if images.ndim != 4 or len(labels) != len(images):
            raise DataError(
                f"split {split!r}",
                f"need images (N, H, W, C) and N labels, got {images.shape} and {len(labels)} labels",
            )
        labels = np.asarray(labels, dtype=np.int64)
        means, stds = _pixel_statistics(images)
        _, height, width, channels = images.shape
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "index": np.arange(len(images), dtype=np.int64),
                    "label": labels,
                    "label_name": _label_names(labels, class_names),
                    "content_hash": [content_hash(image) for image in images],
                    "height": height,
                    "width": width,
                    "channels": channels,
                    "mean_intensity": means,
                    "std_intensity": stds,
                },
                columns=list(IMAGE_MANIFEST_SCHEMA.columns),
            )
        )
    if not frames:
        return pd.DataFrame(columns=list(IMAGE_MANIFEST_SCHEMA.columns))
    return pd.concat(frames, ignore_index=True)


def class_counts(manifest: pd.DataFrame, split: str, class_names: Sequence[str]) -> pd.Series:
    """Records per class name in ``split``, for every name in ``class_names`` (0 if absent)."""
    in_split = manifest.loc[manifest["split"] == split, "label_name"]
    return in_split.value_counts().reindex(list(class_names), fill_value=0)


def cross_split_matches(manifest: pd.DataFrame, split: str, other_split: str) -> pd.DataFrame:
    """Records of ``split`` whose content also occurs in ``other_split`` (train/test leakage).

    Returns:
        One row per such record: ``index`` (in ``split``) and ``other_index`` (the first
        record of ``other_split`` with the same content hash), ordered by ``index``.
    """
    rows = manifest.loc[manifest["split"] == split, ["index", "content_hash"]]
    other = manifest.loc[manifest["split"] == other_split, ["index", "content_hash"]]
    first_in_other = other.drop_duplicates("content_hash").rename(columns={"index": "other_index"})
    matches = rows.merge(first_in_other, on="content_hash", how="inner")
    return matches[["index", "other_index"]].sort_values("index", ignore_index=True)
