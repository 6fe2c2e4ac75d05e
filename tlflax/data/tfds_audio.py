"""Store in-memory audio datasets as real TFDS datasets, without TensorFlow.

The audio counterpart of :func:`tlflax.data.tfds_store.write_image_dataset`, on the same
builder: features ``audio`` (16-bit PCM clips of one fixed length, ``tfds.features.Tensor``),
``sample_rate`` and ``label`` (``ClassLabel``), ``array_record`` files. TFDS's own ``Audio``
feature needs TensorFlow to encode, so clips are stored as plain int16 tensors and each
example carries its sample rate (four bytes beside a clip's 96 KB), which the reader checks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from tlflax.data.errors import DataError
from tlflax.data.tfds_store import check_labels, dataset_version_dir, read_columns, write_dataset

# 16-bit PCM: what the recordings hold, at half the size of float32.
PCM_SCALE = 32767.0


def to_pcm16(waveforms: np.ndarray) -> np.ndarray:
    """Float clips in [-1, 1] as int16 PCM (values beyond full scale are clipped)."""
    return np.round(np.clip(waveforms, -1.0, 1.0) * PCM_SCALE).astype(np.int16)


def write_audio_dataset(
    data_dir: Path,
    name: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    sample_rate: int,
    description: str = "",
) -> Path:
    """Write audio splits as a TFDS ``array_record`` dataset (see :func:`write_dataset`).

    Args:
        data_dir: the TFDS data directory (created if missing).
        name: dataset name, lowercase snake_case (also the folder name).
        splits: split name -> (float32 clips (N, samples) in [-1, 1], integer labels (N,));
            every split's clips have the same length.
        class_names: label names; label ``i`` is ``class_names[i]``.
        sample_rate: the clips' sample rate in Hz.
        description: free text stored in ``dataset_info.json``.

    Returns:
        ``data_dir / name``, the folder that was replaced.

    Raises:
        DataError: naming the split whose arrays are malformed.
    """
    lengths = {split: clips.shape[1:] for split, (clips, _) in splits.items()}
    for split, (clips, labels) in splits.items():
        location = f"dataset {name!r}, split {split!r}"
        if clips.ndim != 2 or not np.issubdtype(clips.dtype, np.floating):
            raise DataError(
                location, f"clips must be float (N, samples), got {clips.dtype} {clips.shape}"
            )
        if len(set(lengths.values())) > 1:
            raise DataError(location, f"clip lengths differ between splits: {lengths}")
        check_labels(location, labels, len(clips), len(class_names))
    (clip_samples,) = next(iter(lengths.values()))
    features = {
        "audio": tfds.features.Tensor(shape=(clip_samples,), dtype=np.int16),
        "sample_rate": tfds.features.Tensor(shape=(), dtype=np.int32),
        "label": tfds.features.ClassLabel(names=list(class_names)),
    }
    columns = {
        split: {
            "audio": to_pcm16(clips),
            "sample_rate": np.full(len(clips), sample_rate, np.int32),
            "label": labels,
        }
        for split, (clips, labels) in splits.items()
    }
    return write_dataset(
        data_dir,
        name,
        features,
        columns,
        supervised_keys=("audio", "label"),
        description=description,
    )


def pcm16_to_float(pcm: np.ndarray) -> np.ndarray:
    """Stored 16-bit PCM -> float32 clips in [-1, 1]."""
    return pcm.astype(np.float32) / PCM_SCALE


def read_audio_split(data_dir: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Load one split of a dataset written by :func:`write_audio_dataset` into memory.

    Returns:
        ``(clips float32 (N, samples) in [-1, 1], labels int64 (N,), sample rate)`` in the
        order they were written.

    Raises:
        DataError: as :func:`read_columns`, or when the split's clips disagree on their
            sample rate.
    """
    columns = read_columns(data_dir, name, split)
    rate = split_sample_rate(data_dir, name, split, columns["sample_rate"])
    clips = (
        pcm16_to_float(np.stack(columns["audio"]))
        if columns["audio"]
        else (np.zeros((0, 0), np.float32))
    )
    return clips, np.asarray(columns["label"], dtype=np.int64), rate


def split_sample_rate(data_dir: Path, name: str, split: str, rates: Iterable) -> int:
    """The one sample rate of a split's clips (``rates``: each clip's; 0 for no clips).

    Raises:
        DataError: naming the dataset folder when the clips disagree.
    """
    distinct = sorted({int(rate) for rate in rates})
    if len(distinct) > 1:
        raise DataError(
            dataset_version_dir(data_dir, name),
            f"split {split!r} mixes sample rates {distinct}",
            "run the `prepare` stage again",
        )
    return distinct[0] if distinct else 0
