"""Read a TFDS catalog dataset (a ``tfds:<name>`` source such as ``tfds:cats_vs_dogs``).

What TFDS does without a network (measured with TFDS 4.9.10): ``tfds.builder(name)`` is
instant (the builder's code ships with TFDS), but ``download_and_prepare`` retries each
download 10 times with exponential backoff and fails only after ~3.5 minutes when the
host name does not resolve, and sets no timeout at all for a connection that hangs. So
this module downloads only when asked (``download=True``), and first checks within
``connect_timeout_s`` that every host in the builder's checksums file answers; without a
network it stops at once with one :class:`~tlflax.data.errors.DataError` naming the
dataset. (Preparing also needs the ``importlib-resources`` package, which TFDS 4.9.10
uses to find a builder's checksums file but declares only for Python < 3.9.)

Without TensorFlow (this project does not install it), a catalog dataset can be read when:

- its examples are stored as ``array_record`` (this module prepares them so; a dataset
  copied in as ``tfrecord``, e.g. from TFDS's GCS mirror, needs TensorFlow and is refused);
- its supervised keys are (input, label) with a ``ClassLabel`` label and an ``Image``
  (uint8; decoded here with Pillow, see :func:`~tlflax.data.image_folder.decode_image`)
  or ``Text`` input. Other inputs (audio, video, float images) and builders whose very
  description calls TensorFlow (``coco``, ``speech_commands``) are refused before
  anything is downloaded;
- when it still has to be prepared here, its builder's code does not call TensorFlow.
  By their TFDS 4.9.10 source, ``beans``, ``horses_or_humans`` and ``tf_flowers``
  (images) and ``imdb_reviews`` and ``ag_news_subset`` (text) do not; ``mnist``,
  ``fashion_mnist`` and ``cifar10`` (``tf.io.gfile``, PNG encoding of arrays) and
  ``cats_vs_dogs`` (JPEG checks) do, which shows only during preparation and is reported
  as needing TensorFlow. A prepared ``array_record`` copy of any of them reads fine.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np
import tensorflow_datasets as tfds

from tlflax.data.errors import DataError
from tlflax.data.image_folder import DEFAULT_MAX_PIXELS, decode_image, stack_images
from tlflax.data.tfds_store import check_labels

CATALOG_PREFIX = "tfds:"
# Our split name -> the TFDS split to read; TFDS slicing ("train[:80%]") is allowed.
DEFAULT_SPLITS: Mapping[str, str] = MappingProxyType({"train": "train", "test": "test"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


class CatalogNotPreparedError(DataError):
    """The catalog dataset is not prepared in the data dir, and downloading was not allowed."""


@dataclass(frozen=True)
class CatalogDataset:
    """A catalog dataset in memory.

    Attributes:
        modality: ``"image"`` (records: uint8 (N, H, W, C)) or ``"text"`` (records: list of str).
        class_names: label ``i`` is ``class_names[i]``.
        splits: split name -> (records, labels int64 (N,)).
    """

    modality: Literal["image", "text"]
    class_names: list[str]
    splits: dict[str, tuple[np.ndarray | list[str], np.ndarray]]


def read_tfds_catalog(
    name: str,
    data_dir: Path,
    *,
    splits: Mapping[str, str] = DEFAULT_SPLITS,
    download: bool = False,
    image_size: int | None = None,
    channels: int = 3,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    connect_timeout_s: float = 10.0,
) -> CatalogDataset:
    """Read a TFDS catalog dataset, preparing it into ``data_dir`` first if asked to.

    Args:
        name: the TFDS name, with optional config and version (``"mnist"``,
            ``"imdb_reviews/plain_text:1.0.0"``), without the ``tfds:`` prefix.
        data_dir: the TFDS data directory where the prepared dataset is (or goes).
        splits: our split name -> TFDS split or slice, e.g. ``{"train": "train[:80%]",
            "test": "train[80%:]"}`` for a dataset that ships only a train split.
        download: download and prepare the dataset when ``data_dir`` lacks it (needs a
            network); False refuses instead, at once.
        image_size, channels, max_pixels: for image datasets, as for
            :func:`~tlflax.data.image_folder.decode_image`; ``image_size`` is needed when
            the images do not all have one size.
        connect_timeout_s: how long each download host may take to answer the
            connection check before the download is refused.

    Returns:
        The requested splits in memory, with the dataset's class names.

    Raises:
        CatalogNotPreparedError: naming ``tfds:<name>`` when it is not prepared and
            ``download`` is False.
        DataError: naming ``tfds:<name>`` when the name is not in the catalog, its
            features cannot be read without TensorFlow, a download host is unreachable,
            preparing needs TensorFlow, or a split is unknown; or naming the record that
            cannot be decoded.
    """
    source = f"{CATALOG_PREFIX}{name}"
    builder = _catalog_builder(name, data_dir)
    input_key, label_key, modality = _supervised_keys(builder, source)
    builder = _readable_builder(
        builder, name, data_dir, download=download, connect_timeout_s=connect_timeout_s
    )
    class_names = list(builder.info.features[label_key].names)
    decode_input = _input_decoder(
        modality, image_size=image_size, channels=channels, max_pixels=max_pixels
    )
    read = {}
    for split, tfds_split in splits.items():
        location = f"{source} {tfds_split}"
        inputs, labels = _read_split(
            builder, tfds_split, location, input_key, label_key, decode_input
        )
        # Catalog splits without labels (imdb_reviews' "unsupervised") store -1: refused.
        check_labels(location, labels, len(inputs), len(class_names))
        read[split] = (_stack_if_images(modality, inputs, location), labels)
    return CatalogDataset(modality, class_names, read)


def _readable_builder(
    builder: tfds.core.DatasetBuilder,
    name: str,
    data_dir: Path,
    *,
    download: bool,
    connect_timeout_s: float,
) -> tfds.core.DatasetBuilder:
    """A builder of ``name`` whose dataset is prepared as array_record, preparing it if allowed.

    Raises:
        CatalogNotPreparedError: when it is not prepared and ``download`` is False.
        DataError: when it is prepared in a format that needs TensorFlow to read, or
            preparing it fails (see :func:`_download_and_prepare`).
    """
    source = f"{CATALOG_PREFIX}{name}"
    with _absl_warnings_silenced():
        prepared = builder.is_prepared()
    if not prepared:
        if not download:
            raise CatalogNotPreparedError(
                source,
                f"not prepared in {data_dir}",
                "downloading it needs a network: allow the download where one exists, or "
                f"copy a prepared (array_record) {builder.info.full_name} into {data_dir}",
            )
        # TFDS writes tfrecord files unless told otherwise; those need TensorFlow to read.
        builder = _catalog_builder(name, data_dir, file_format="array_record")
        _download_and_prepare(builder, source, data_dir, connect_timeout_s)
    elif tfds.core.FileFormat.ARRAY_RECORD not in builder.info.available_file_formats():
        raise DataError(
            source,
            f"prepared in {data_dir} as {builder.info.file_format.value}, which needs "
            "TensorFlow to read",
            "delete it and let it be prepared here again (as array_record)",
        )
    return builder


def _input_decoder(
    modality: Literal["image", "text"], *, image_size: int | None, channels: int, max_pixels: int
) -> Callable[[bytes, str], Any]:
    """What turns one stored input and its location into an image array or a text."""
    if modality == "image":
        return functools.partial(
            decode_image, image_size=image_size, channels=channels, max_pixels=max_pixels
        )
    return _utf8


def _stack_if_images(
    modality: Literal["image", "text"], inputs: list[Any], location: str
) -> np.ndarray | list[str]:
    """Images stacked into one uint8 (N, H, W, C) array (one shape required); texts as they are."""
    return stack_images(inputs, _places(location, inputs)) if modality == "image" else inputs


def catalog_modality(name: str, data_dir: Path) -> Literal["image", "text"]:
    """What a TFDS catalog dataset's inputs are, from its description alone (nothing is read).

    Raises:
        DataError: as :func:`read_tfds_catalog` does for the name and the features.
    """
    builder = _catalog_builder(name, data_dir)
    return _supervised_keys(builder, f"{CATALOG_PREFIX}{name}")[2]


def _places(location: str, records: list[object]) -> list[str]:
    return [f"{location}[{position}]" for position in range(len(records))]


def _read_split(
    builder: tfds.core.DatasetBuilder,
    tfds_split: str,
    location: str,
    input_key: str,
    label_key: str,
    decode_input: Callable[[bytes, str], Any],
) -> tuple[list[Any], np.ndarray]:
    """One split's decoded inputs and its labels (-1 where a split is unlabelled)."""
    try:
        # Inputs come undecoded, to be decoded by `decode_input`, which names a bad record.
        records = builder.as_data_source(
            split=tfds_split, decoders={input_key: tfds.decode.SkipDecoding()}
        )
    except ValueError as error:
        raise DataError(location, f"cannot read this split: {error}") from None
    if len(records) == 0:
        raise DataError(location, "split is empty")
    examples = records.__getitems__(range(len(records)))
    inputs = [
        decode_input(example[input_key], place)
        for example, place in zip(examples, _places(location, examples), strict=True)
    ]
    return inputs, np.array([example[label_key] for example in examples], dtype=np.int64)


@contextlib.contextmanager
def _refuse_tensorflow_need(source: str, step: str, hint: str) -> Iterator[None]:
    """Turn TFDS's failed import of TensorFlow during ``step`` into a :class:`DataError`."""
    try:
        yield
    except ModuleNotFoundError as error:
        # TFDS re-raises with its context prepended, dropping `error.name`.
        if "No module named 'tensorflow'" not in str(error):
            raise
        raise DataError(source, f"its TFDS builder calls TensorFlow {step}", hint) from None


@contextlib.contextmanager
def _absl_warnings_silenced() -> Iterator[None]:
    """Hold back TFDS's absl warnings while it checks for a prepared copy.

    TFDS warns that the (missing) version folder has no ``dataset_info.json``; whether
    the dataset is prepared is this module's one message.
    """
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _catalog_builder(name: str, data_dir: Path, **options: str) -> tfds.core.DatasetBuilder:
    """The builder of ``name`` in ``data_dir`` (``options``: more builder arguments)."""
    source = f"{CATALOG_PREFIX}{name}"
    # Even reading a prepared copy runs the builder's code, so only installing TF helps.
    with _refuse_tensorflow_need(source, "to describe the dataset", "install tensorflow-cpu"):
        try:
            return tfds.builder(name, data_dir=data_dir, **options)
        except tfds.core.registered.DatasetNotFoundError:
            # Community datasets are left out: listing them needs TensorFlow (GCS access).
            known = tfds.list_builders(with_community_datasets=False)
            nearest = difflib.get_close_matches(name.split("/")[0].split(":")[0], known, n=3)
            raise DataError(
                source,
                "not in the TFDS catalog",
                f"did you mean {', '.join(nearest)}?" if nearest else "see tfds.list_builders()",
            ) from None
        except (AssertionError, ValueError) as error:  # a bad config, version or name syntax
            # Keep TFDS's reason, without the 'Failed to construct dataset "x", builder_kwargs
            # "{...}": ' context it prepends.
            reason = str(error).splitlines()[0].split('": ', 1)[-1]
            raise DataError(source, reason) from None


def _supervised_keys(
    builder: tfds.core.DatasetBuilder, source: str
) -> tuple[str, str, Literal["image", "text"]]:
    """The input and label keys and the modality, if this module can read the dataset."""
    features = builder.info.features
    keys = builder.info.supervised_keys
    label = features[keys[1]] if keys and isinstance(keys[1], str) else None
    if (
        keys is None
        or not isinstance(keys[0], str)
        or not isinstance(label, tfds.features.ClassLabel)
    ):
        raise DataError(
            source,
            f"supervised keys {keys} are not (input, ClassLabel label)",
            "only single-label classification datasets are supported",
        )
    input_feature = features[keys[0]]
    # `np_dtype`, not `dtype`: the latter converts to a TensorFlow dtype.
    if isinstance(input_feature, tfds.features.Image) and input_feature.np_dtype == np.uint8:
        return keys[0], keys[1], "image"
    if isinstance(input_feature, tfds.features.Text):
        return keys[0], keys[1], "text"
    raise DataError(
        source,
        f"input feature {keys[0]!r} is {input_feature!r}; without TensorFlow only uint8 Image "
        "and Text inputs can be read",
    )


def _utf8(raw: bytes, location: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(location, f"text is not UTF-8 ({error.reason})") from None


def _download_and_prepare(
    builder: tfds.core.DatasetBuilder, source: str, data_dir: Path, connect_timeout_s: float
) -> None:
    """Download and prepare ``builder``'s dataset, failing fast when a host is unreachable."""
    # A builder without a checksums file does not say where it downloads from; TFDS's own
    # retries are then the only bound.
    urls = [urlparse(url) for url in builder.url_infos or {}]
    hosts = sorted(
        {(url.hostname, url.port or _DEFAULT_PORTS.get(url.scheme, 443)) for url in urls}
    )
    for host, port in hosts:
        try:
            socket.create_connection((host, port), timeout=connect_timeout_s).close()
        except OSError as error:
            raise DataError(
                source,
                f"cannot reach {host} to download it ({error})",
                "downloading needs a network; or prepare it where one exists and copy the "
                f"prepared dataset into {data_dir}",
            ) from None
    # try_download_gcs=False: TFDS's GCS mirror holds tfrecord files, which need
    # TensorFlow to read; generating from the original files writes array_record.
    with _refuse_tensorflow_need(
        source,
        "while preparing the dataset",
        "install tensorflow-cpu, or prepare it where TensorFlow is installed (file_format="
        "array_record) and copy it into the data_dir",
    ):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
