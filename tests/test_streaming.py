"""Splits read on demand (tlflax.data.streaming) give the batches the in-memory arrays give."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tlflax.checkpoint import tree_digest
from tlflax.data.errors import DataError
from tlflax.data.pipeline import iterate_batches, map_batches
from tlflax.data.streaming import StoredColumn, stored_audio_inputs, stored_image_inputs
from tlflax.data.tfds_audio import read_audio_split, write_audio_dataset
from tlflax.data.tfds_store import (
    dataset_version_dir,
    read_image_split,
    write_dataset,
    write_image_dataset,
)

NAME = "streamed"


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> Path:
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, size=(53, 6, 5, 1), dtype=np.uint8)
    labels = generator.integers(0, 3, size=53)
    data_dir = tmp_path_factory.mktemp("tfds")
    write_image_dataset(data_dir, NAME, {"train": (images, labels)}, ["a", "b", "c"])
    return data_dir


def test_a_stored_column_reads_what_was_written(stored: Path):
    images, labels = read_image_split(stored, NAME, "train")
    inputs = stored_image_inputs(stored, NAME, "train")
    column = inputs["image"]
    assert isinstance(column, StoredColumn)
    assert (len(column), column.shape, column.dtype) == (53, images.shape, np.uint8)
    np.testing.assert_array_equal(inputs["label"], labels)
    np.testing.assert_array_equal(column[np.array([7, 0, 7, 52])], images[[7, 0, 7, 52]])
    np.testing.assert_array_equal(column[3:9], images[3:9])
    np.testing.assert_array_equal(column[4], images[4])
    np.testing.assert_array_equal(np.asarray(column), images)
    # The run fingerprint of a streamed split is that of the same arrays in memory.
    assert tree_digest(inputs) == tree_digest({"image": images, "label": labels})
    with pytest.raises(IndexError):
        column[np.array([53])]


@pytest.mark.parametrize(
    "options",
    [
        {"shuffle": False},
        {"shuffle": True, "epoch": 3},
        {"shuffle": True, "drop_remainder": True},
        {"shuffle": True, "balanced": True, "epoch": 1},
    ],
)
def test_streamed_batches_equal_in_memory_ones(stored: Path, options: dict):
    images, labels = read_image_split(stored, NAME, "train")
    streamed = iterate_batches(stored_image_inputs(stored, NAME, "train"), 8, seed=5, **options)
    in_memory = iterate_batches({"image": images, "label": labels}, 8, seed=5, **options)
    pairs = list(zip(streamed, in_memory, strict=True))
    assert pairs
    for left, right in pairs:
        assert left.keys() == right.keys()
        for key in left:
            np.testing.assert_array_equal(left[key], right[key])


def test_shards_of_a_batch_are_its_equal_parts(stored: Path):
    inputs = stored_image_inputs(stored, NAME, "train")
    whole = list(iterate_batches(inputs, 8, shuffle=True, seed=1))
    parts = [list(iterate_batches(inputs, 8, shuffle=True, seed=1, shard=(i, 2))) for i in (0, 1)]
    for batch, first, second in zip(whole, *parts, strict=True):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])
    with pytest.raises(DataError, match="does not split into 3"):
        iterate_batches(inputs, 8, shuffle=False, seed=0, shard=(0, 3))


def test_map_batches_over_a_stored_column_keeps_order(stored: Path):
    images, _ = read_image_split(stored, NAME, "train")
    column = stored_image_inputs(stored, NAME, "train")["image"]
    sums = map_batches(
        lambda batch: batch["image"].reshape(len(batch["image"]), -1).sum(axis=1),
        {"image": column},
        batch_size=16,
        description="sums",
    )
    np.testing.assert_array_equal(sums, images.reshape(53, -1).sum(axis=1))


def test_a_truncated_store_is_named(stored: Path, tmp_path: Path):
    copy = tmp_path / "tfds"
    shutil.copytree(stored, copy)
    (record_file,) = dataset_version_dir(copy, NAME).glob("*-train.array_record*")
    record_file.write_bytes(record_file.read_bytes()[: record_file.stat().st_size // 2])
    with pytest.raises(DataError) as failure:
        inputs = stored_image_inputs(copy, NAME, "train")
        list(iterate_batches(inputs, 8, shuffle=False, seed=0))
    assert str(dataset_version_dir(copy, NAME)) in str(failure.value)


def test_stored_clips_read_as_the_whole_split_reads_them(tmp_path: Path):
    generator = np.random.default_rng(1)
    clips = generator.uniform(-1, 1, size=(9, 400)).astype(np.float32)
    labels = generator.integers(0, 2, size=9)
    write_audio_dataset(tmp_path, "clips", {"train": (clips, labels)}, ["a", "b"], 16000)
    whole, whole_labels, rate = read_audio_split(tmp_path, "clips", "train")
    inputs, stored_rate = stored_audio_inputs(tmp_path, "clips", "train")
    assert stored_rate == rate == 16000
    assert inputs["audio"].dtype == np.float32 and inputs["audio"].shape == whole.shape
    np.testing.assert_array_equal(inputs["audio"][np.array([8, 2, 2])], whole[[8, 2, 2]])
    np.testing.assert_array_equal(np.asarray(inputs["audio"]), whole)
    np.testing.assert_array_equal(inputs["label"], whole_labels)


def test_clips_of_two_sample_rates_are_refused_by_both_readers(tmp_path: Path):
    features = {
        "audio": tfds.features.Tensor(shape=(40,), dtype=np.int16),
        "sample_rate": tfds.features.Tensor(shape=(), dtype=np.int32),
        "label": tfds.features.ClassLabel(names=["a", "b"]),
    }
    columns = {
        "audio": np.zeros((2, 40), np.int16),
        "sample_rate": np.array([16000, 8000], np.int32),
        "label": np.array([0, 1]),
    }
    write_dataset(
        tmp_path, "mixed", features, {"train": columns}, supervised_keys=("audio", "label")
    )
    for read in (read_audio_split, stored_audio_inputs):
        with pytest.raises(DataError, match=r"split 'train' mixes sample rates \[8000, 16000\]"):
            read(tmp_path, "mixed", "train")
