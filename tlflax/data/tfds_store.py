"""Store in-memory datasets as real TFDS datasets, without TensorFlow.

Layout: ``<data_dir>/<name>/1.0.0/`` with ``dataset_info.json``, ``features.json`` and one
``array_record`` file per split, readable by any TFDS tooling
(``tfds.builder_from_directory``, grain, ``builder.as_data_source``).

Choices that keep TensorFlow out (see STACK-NOTES, "TFDS without TensorFlow"):
images are uint8 ``Tensor`` features, not ``Image`` (whose PNG encoding calls TF); the
file format is ``array_record``, not tfrecord; reading goes through data sources, never
``as_dataset``.

One builder, :class:`InMemoryDataset`, serves every modality: a modality names its
features and hands over one column per feature. This module holds the image modality;
:mod:`tlflax.data.tfds_text` the text one.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tlflax.data.errors import DataError
from tlflax.data.store_errors import check_record, first_line, split_file, unreadable_split

DATASET_VERSION = "1.0.0"
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
# Records decoded per `__getitems__` call when reading: bounds the Python dicts alive at once.
_READ_CHUNK = 8192

# split name -> feature name -> one value per example (anything indexable by position).
SplitColumns = Mapping[str, Mapping[str, Any]]


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """The info of a dataset that exists only on this machine.

    A builder whose folder holds no ``dataset_info.json`` yet asks TFDS's public bucket for
    pre-computed info; TFDS 4.9.10 creates a temporary folder for the answer *before* it
    finds the bucket disabled, and never removes it: one empty ``/tmp/tmp*tfds`` folder
    per dataset written. There is nothing of ours in that bucket.
    """

    def initialize_from_bucket(self) -> None:
        return None


class InMemoryDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder over examples already in memory, one column per feature.

    Registration is skipped because one class serves every dataset name; the name is
    set per instance (TFDS reads ``self.name`` for paths and ``dataset_info.json``).
    Examples keep their order (``disable_shuffling``) and carry their position in the
    split as ``id``, so a split reads back exactly as it was written.
    """

    VERSION = tfds.core.Version(DATASET_VERSION)

    def __init__(
        self,
        *,
        name: str,
        features: Mapping[str, tfds.features.FeatureConnector],
        splits: SplitColumns,
        supervised_keys: tuple[str, str],
        description: str,
        data_dir: Path,
    ) -> None:
        self.name = name
        self._features = dict(features)
        self._splits = splits
        self._supervised_keys = supervised_keys
        self._description = description
        super().__init__(data_dir=data_dir, file_format="array_record")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS looks beside the builder's source file for a download-checksums file. Finding
        # that file for a class inside an installed package imports `importlib_resources`,
        # which TFDS 4.9.10 only declares for Python < 3.9; there is nothing to download
        # here, so there is no source folder to search.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo is built directly: `dataset_info_from_configs` expects the builder to
        # live in a TFDS-style package with metadata files beside it.
        return _LocalDatasetInfo(
            builder=self,
            description=self._description,
            features=tfds.features.FeaturesDict(
                {**self._features, "id": tfds.features.Scalar(dtype=np.int64)}
            ),
            supervised_keys=self._supervised_keys,
            disable_shuffling=True,
        )

    def _split_generators(
        self, dl_manager: tfds.download.DownloadManager
    ) -> dict[str, Iterator[tuple[int, dict[str, object]]]]:
        return {split: self._generate_examples(split) for split in self._splits}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, object]]]:
        columns = self._splits[split]
        for position in range(len(columns["label"])):
            example = {feature: column[position] for feature, column in columns.items()}
            yield position, {**example, "id": position}


def dataset_version_dir(data_dir: Path, name: str) -> Path:
    """The folder holding ``dataset_info.json`` of dataset ``name`` under ``data_dir``."""
    return data_dir / name / DATASET_VERSION


def write_dataset(
    data_dir: Path,
    name: str,
    features: Mapping[str, tfds.features.FeatureConnector],
    splits: SplitColumns,
    *,
    supervised_keys: tuple[str, str],
    description: str = "",
) -> Path:
    """Write columns of examples as a TFDS ``array_record`` dataset, replacing any previous one.

    The dataset is built in a temporary folder beside the target and renamed into
    place only once complete, so an interrupted or failing build leaves no half-written
    dataset and an existing good dataset in place. Modalities check their columns first
    (see :func:`write_image_dataset`); this function checks only the name and the splits.

    Args:
        data_dir: the TFDS data directory (created if missing).
        name: dataset name, lowercase snake_case (also the folder name).
        features: feature name -> TFDS feature; every split has one column per feature,
            ``"label"`` included. An ``id`` feature (the position in the split) is added.
        splits: split name -> feature name -> values, one per example.
        supervised_keys: (input feature, label feature).
        description: free text stored in ``dataset_info.json``.

    Returns:
        ``data_dir / name``, the folder that was replaced.

    Raises:
        DataError: naming the bad name, or the split that is empty.
    """
    _check_name_and_splits(name, splits)
    for split, columns in splits.items():
        if len(columns["label"]) == 0:
            # TFDS cannot finalise a split without examples.
            raise DataError(f"dataset {name!r}, split {split!r}", "split is empty")
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / name
    _remove_stale_builds(data_dir, name)
    # Same parent folder => same filesystem => the final renames are atomic.
    build_root = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=data_dir))
    try:
        builder = InMemoryDataset(
            name=name,
            features=features,
            splits=splits,
            supervised_keys=supervised_keys,
            description=description,
            data_dir=build_root,
        )
        with _deterministic_serialization():
            builder.download_and_prepare(download_dir=build_root / "downloads")
        _swap_into_place(build_root / name, target, build_root / "previous")
    finally:
        shutil.rmtree(build_root, ignore_errors=True)
    return target


def _remove_stale_builds(data_dir: Path, name: str) -> None:
    """Delete build folders of ``name`` that earlier, killed writes left in ``data_dir``."""
    # A process killed outright (no `finally`) leaves its build folder behind; it must not
    # linger in data_dir, which a DVC stage may track as an output.
    for stale_build in data_dir.glob(f".{name}.building-*"):
        shutil.rmtree(stale_build, ignore_errors=True)


def _swap_into_place(built: Path, target: Path, previous: Path) -> None:
    """Rename ``built`` to ``target``, first moving an existing ``target`` to ``previous``."""
    # A directory cannot be renamed over a non-empty one: move the old dataset into
    # the build folder (deleted by the caller), then the new one into place.
    if target.exists():
        target.rename(previous)
    try:
        built.rename(target)
    except OSError:
        if previous.exists():  # put the old dataset back before the cleanup deletes it
            previous.rename(target)
        raise


@contextlib.contextmanager
def _deterministic_serialization() -> Iterator[None]:
    """Serialize examples with their features in a fixed order while a dataset is written.

    A ``tf.train.Example`` holds its features in a protobuf map, and protobuf's C runtime
    iterates a map in an order seeded per process: the same records wrote different bytes on
    every run, so each ``prepare`` gave DVC a "changed" dataset and re-ran every stage after
    it. Deterministic serialization sorts the map keys; the records read back the same.
    """
    serializer = tfds.core.example_serializer.ExampleSerializer
    original = serializer.serialize_example

    def serialize_example(self: Any, example: Any) -> bytes:
        return self.get_tf_example(example).SerializeToString(deterministic=True)

    serializer.serialize_example = serialize_example
    try:
        yield
    finally:
        serializer.serialize_example = original


def _check_name_and_splits(name: str, splits: Mapping[str, object]) -> None:
    if not _NAME_PATTERN.match(name):
        raise DataError(f"dataset {name!r}", "name must be lowercase snake_case ([a-z][a-z0-9_]*)")
    if not splits:
        raise DataError(f"dataset {name!r}", "no splits given")


def check_labels(location: str, labels: np.ndarray, count: int, num_classes: int) -> None:
    """Raise :class:`DataError` at ``location`` unless ``labels`` are ``count`` ids < ``num_classes``."""
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            location,
            f"labels must be integers of shape ({count},), got {labels.dtype} {labels.shape}",
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            location,
            f"labels span [{labels.min()}, {labels.max()}] but there are {num_classes} classes",
        )


def write_image_dataset(
    data_dir: Path,
    name: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: Sequence[str],
    description: str = "",
) -> Path:
    """Write image splits as a TFDS ``array_record`` dataset (see :func:`write_dataset`).

    Args:
        data_dir: the TFDS data directory (created if missing).
        name: dataset name, lowercase snake_case (also the folder name).
        splits: split name -> (images uint8 (N, H, W, C), integer labels (N,)); every
            split must have the same image shape.
        class_names: label names; label ``i`` is ``class_names[i]``.
        description: free text stored in ``dataset_info.json``.

    Returns:
        ``data_dir / name``, the folder that was replaced.

    Raises:
        DataError: naming the split whose arrays are malformed, or the bad name.
    """
    _check_name_and_splits(name, splits)
    image_shapes = {split: images.shape[1:] for split, (images, _) in splits.items()}
    for split, (images, labels) in splits.items():
        location = f"dataset {name!r}, split {split!r}"
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(
                location, f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}"
            )
        if images.shape[1:] != next(iter(image_shapes.values())):
            raise DataError(location, f"image shapes differ between splits: {image_shapes}")
        check_labels(location, labels, len(images), len(class_names))
    features = {
        "image": tfds.features.Tensor(shape=next(iter(image_shapes.values())), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=list(class_names)),
    }
    columns = {
        split: {"image": images, "label": labels} for split, (images, labels) in splits.items()
    }
    return write_dataset(
        data_dir,
        name,
        features,
        columns,
        supervised_keys=("image", "label"),
        description=description,
    )


def _load_builder(data_dir: Path, name: str) -> tfds.core.DatasetBuilder:
    # Read by directory, not by `tfds.builder(name)`: our names may collide with TFDS catalog
    # datasets (e.g. "fashion_mnist"), whose registered builders have other features.
    version_dir = dataset_version_dir(data_dir, name)
    if not (version_dir / "dataset_info.json").is_file():
        raise DataError(version_dir, "no TFDS dataset here", "run the `prepare` stage to write it")
    try:
        return tfds.builder_from_directory(version_dir)
    except Exception as error:  # noqa: BLE001
        # Damaged metadata fails in protobuf, json or TFDS itself, with messages that never
        # name the folder; any failure here means the folder is not a usable dataset.
        raise DataError(
            version_dir,
            f"unreadable TFDS dataset metadata ({type(error).__name__}: {first_line(error)})",
            "run the `prepare` stage again",
        ) from None


def _read_records(
    builder: tfds.core.DatasetBuilder, version_dir: Path, split: str
) -> Iterator[dict[str, Any]]:
    """Every record of ``split``, decoded, in order; a damaged file is named."""
    location = split_file(version_dir, split)
    try:
        source = builder.as_data_source(split=split)
        count = len(source)
        for start in range(0, count, _READ_CHUNK):
            # `__getitems__` decodes a whole chunk in one call.
            chunk = source.__getitems__(range(start, min(start + _READ_CHUNK, count)))
            for position, record in enumerate(chunk, start=start):
                check_record(location, split, position, count, record)
                yield record
    except (RuntimeError, OSError) as error:
        # array_record reports a missing or corrupt file as a RuntimeError.
        raise unreadable_split(location, split, error) from None


def read_columns(data_dir: Path, name: str, split: str) -> dict[str, list[Any]]:
    """One split of a dataset written by :func:`write_dataset`, as feature name -> values.

    Values are as TFDS decodes them (numpy arrays and scalars; ``Text`` as UTF-8 bytes), in
    the order they were written; the ``id`` feature is checked and dropped.

    Raises:
        DataError: naming the dataset folder when it or the split is missing, or when the
            stored ``id``s are not exactly 0..N-1.
    """
    builder = _load_builder(data_dir, name)
    if split not in builder.info.splits:
        raise DataError(
            dataset_version_dir(data_dir, name),
            f"no split {split!r}; available: {sorted(builder.info.splits)}",
        )
    columns: dict[str, list[Any]] = {feature: [] for feature in builder.info.features}
    for record in _read_records(builder, dataset_version_dir(data_dir, name), split):
        for feature, values in columns.items():
            values.append(record[feature])
    count = len(columns["id"])
    if not np.array_equal(np.asarray(columns.pop("id"), dtype=np.int64), np.arange(count)):
        raise DataError(
            dataset_version_dir(data_dir, name),
            f"split {split!r}: stored ids are not 0..{count - 1} in order; the dataset was not "
            "written by this module or is damaged",
        )
    return columns


def read_image_split(data_dir: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of a dataset written by :func:`write_image_dataset` into memory.

    Returns:
        ``(images uint8 (N, H, W, C), labels int64 (N,))`` in the order they were written.

    Raises:
        DataError: as :func:`read_columns`.
    """
    columns = read_columns(data_dir, name, split)
    return np.stack(columns["image"]), np.asarray(columns["label"], dtype=np.int64)


def read_image_shape(data_dir: Path, name: str) -> tuple[int, int, int]:
    """The (height, width, channels) every image of dataset ``name`` has."""
    return tuple(_load_builder(data_dir, name).info.features["image"].shape)


def read_class_names(data_dir: Path, name: str) -> list[str]:
    """The label names stored with dataset ``name`` (label ``i`` -> element ``i``)."""
    return list(_load_builder(data_dir, name).info.features["label"].names)
