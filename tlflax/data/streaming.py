"""Stored splits read on demand: host memory bounded by a batch, not by the dataset.

:func:`stored_image_inputs` returns a split of an image dataset written by
:mod:`tlflax.data.tfds_store` as ``{"image": StoredColumn, "label": labels}``. The labels are
in memory (8 bytes an example); the images stay in the ``array_record`` file and are read
through Google's ``grain`` (a :class:`grain.MapDataset` over the TFDS data source: random
access by index) when a batch asks for them. Everything that takes batches of a split -
:func:`tlflax.data.pipeline.iterate_batches`, ``map_batches``, the training and evaluation
loops, feature extraction - takes a :class:`StoredColumn` where it took an array, with the
same values in the same order: the results of a run do not change.

Reading is the host's work; while the accelerator runs one step, the next batches are read
in grain's background threads (:func:`prefetched`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from tlflax.data.errors import DataError
from tlflax.data.store_errors import check_record, split_file, unreadable_split
from tlflax.data.tfds_audio import pcm16_to_float, split_sample_rate
from tlflax.data.tfds_store import _READ_CHUNK, _load_builder, dataset_version_dir

# Batches read ahead of the step that uses them, each in its own grain thread: two keep the
# step fed when reading a batch takes less time than a step, and bound memory to two batches.
PREFETCH_BATCHES = 2


class StoredColumn:
    """One feature of a stored split, read on demand; indexed like the array it stands for.

    ``column[indices]`` (an integer array, a slice or an int) decodes just those records;
    ``len``, ``shape``, ``dtype`` and ``ndim`` are those of the whole column without reading it.
    ``np.asarray(column)`` reads it all: for code that needs the array and a small split.
    """

    def __init__(
        self,
        data_dir: Path,
        name: str,
        split: str,
        feature: str,
        convert: Callable[[np.ndarray], np.ndarray] | None = None,
        converted_dtype: np.dtype | None = None,
    ):
        """``convert`` (with the ``converted_dtype`` it returns) turns each batch of stored
        values into the values the column stands for, e.g. 16-bit PCM into float clips."""
        version_dir = dataset_version_dir(data_dir, name)
        self.split, self.feature = split, feature
        builder = _load_builder(data_dir, name)
        if split not in builder.info.splits:
            raise DataError(
                version_dir, f"no split {split!r}; available: {sorted(builder.info.splits)}"
            )
        self.location = split_file(version_dir, split)  # what errors name
        info = builder.info.features[feature]
        try:
            self.records = grain.MapDataset.source(builder.as_data_source(split=split))
            count = len(self.records)
        except (RuntimeError, OSError) as error:
            raise unreadable_split(self.location, split, error) from None
        self.shape = (count, *info.shape)
        self.stored_dtype = np.dtype(info.np_dtype)
        self.convert = convert
        self.dtype = np.dtype(converted_dtype) if convert else self.stored_dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self._read(np.asarray([index]))[0]
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        return self._read(np.asarray(index))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = (
            np.concatenate(list(self.chunks())) if len(self) else np.empty(self.shape, self.dtype)
        )
        return whole if dtype is None else whole.astype(dtype)

    def chunks(self) -> Iterator[np.ndarray]:
        """The column in order, a bounded chunk at a time."""
        for start in range(0, len(self), _READ_CHUNK):
            yield self[start : min(start + _READ_CHUNK, len(self))]

    def hash_into(self, digest: Any) -> None:
        """Feed dtype, shape and values to ``digest`` (a hashlib object) as
        :func:`tlflax.checkpoint.tree_digest` feeds an array's, a chunk at a time: the
        digest equals that of ``np.asarray(self)``."""
        digest.update(f"{self.dtype}{self.shape}".encode())
        for chunk in self.chunks():
            digest.update(np.ascontiguousarray(chunk).tobytes())

    def whole(self, features: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Other (small) features of the same split, each read whole, all in one pass."""
        values: dict[str, list] = {feature: [] for feature in features}
        for start in range(0, len(self), _READ_CHUNK):
            for record in self._records(np.arange(start, min(start + _READ_CHUNK, len(self)))):
                for feature, column in values.items():
                    column.append(record[feature])
        return {feature: np.asarray(column) for feature, column in values.items()}

    def _read(self, indices: np.ndarray) -> np.ndarray:
        values = [record[self.feature] for record in self._records(indices)]
        if not values:
            return np.empty((0, *self.shape[1:]), self.dtype)
        stored = np.stack(values).astype(self.stored_dtype, copy=False)
        return stored if self.convert is None else self.convert(stored)

    def _records(self, indices: np.ndarray) -> list[dict[str, Any]]:
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"{self.location} split {self.split!r}: index out of range")
        try:
            # grain's MapDataset reads a batch of records in one call (array_record's
            # parallel random access), each decoded by TFDS.
            records = self.records._getitems(list(np.asarray(indices) % max(len(self), 1)))
        except (RuntimeError, OSError) as error:
            raise unreadable_split(self.location, self.split, error) from None
        for position, record in zip(indices, records, strict=True):
            check_record(self.location, self.split, int(position), len(self), record)
        return records


def stored_image_inputs(data_dir: Path, name: str, split: str) -> dict[str, Any]:
    """``{"image": StoredColumn, "label": int64 labels}`` of one split of an image dataset
    written by :func:`tlflax.data.tfds_store.write_image_dataset`.

    Raises:
        DataError: naming the dataset folder when it, the split or a record is unreadable.
    """
    images = StoredColumn(data_dir, name, split, "image")
    return {"image": images, "label": images.whole(("label",))["label"].astype(np.int64)}


def stored_audio_inputs(data_dir: Path, name: str, split: str) -> tuple[dict[str, Any], int]:
    """``({"audio": StoredColumn, "label": labels}, sample rate)`` of one split of a dataset
    written by :func:`tlflax.data.tfds_audio.write_audio_dataset`; the clips read as float32
    in [-1, 1], as :func:`~tlflax.data.tfds_audio.read_audio_split` returns them.

    Raises:
        DataError: as :func:`stored_image_inputs`, or when the clips disagree on their rate.
    """
    clips = StoredColumn(
        data_dir, name, split, "audio", convert=pcm16_to_float, converted_dtype=np.float32
    )
    small = clips.whole(("label", "sample_rate"))
    rate = split_sample_rate(data_dir, name, split, small["sample_rate"])
    return {"audio": clips, "label": small["label"].astype(np.int64)}, rate


def is_stored(arrays: dict[str, Any]) -> bool:
    """Whether any column of ``arrays`` is read on demand."""
    return any(isinstance(column, StoredColumn) for column in arrays.values())


def prefetched(make_batch: Callable[[int], dict[str, np.ndarray]], count: int) -> Iterator[dict]:
    """``make_batch(0) ... make_batch(count - 1)`` in order, each read ahead in one of grain's
    background threads while the caller works on the one before."""
    options = grain.ReadOptions(num_threads=PREFETCH_BATCHES, prefetch_buffer_size=PREFETCH_BATCHES)
    return iter(grain.MapDataset.range(count).map(make_batch).to_iter_dataset(options))
