"""Read Fashion-MNIST from its original idx ``.gz`` files.

The files come from the Debian package ``dataset-fashion-mnist`` (fetched by
``make assets`` / ``scripts/fetch_assets.sh``); this module only reads and checks them.
The idx format is a big-endian header — two zero bytes, a dtype code, the number of
dimensions, then one uint32 per dimension — followed by the raw values.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from tlflax.data.errors import DataError

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# split -> (images file, labels file), as published by Zalando Research.
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_FETCH_HINT = "fetch it with `make assets` (scripts/fetch_assets.sh)"
_IDX_UNSIGNED_BYTE = 0x08
_IMAGE_SIDE = 28


def read_idx_file(path: Path, *, expected_ndim: int) -> np.ndarray:
    """Read one gzip-compressed idx file of unsigned bytes.

    Args:
        path: the ``.gz`` file.
        expected_ndim: 3 for an image file (N, rows, cols), 1 for a label file (N,).

    Returns:
        The uint8 array with the shape the header declares.

    Raises:
        DataError: naming ``path`` when it is missing, not gzip, truncated, or its
            header (magic number, dtype, rank, sizes) does not match its contents.
    """
    if not path.is_file():
        raise DataError(path, "file not found", _FETCH_HINT)
    try:
        with gzip.open(path, "rb") as stream:
            content = stream.read()
    except (OSError, EOFError, zlib.error) as error:
        # gzip raises BadGzipFile (an OSError) for a wrong header and EOFError for a cut-off stream.
        raise DataError(path, f"not a readable gzip file ({error})", _FETCH_HINT) from error

    header_size = 4 + 4 * expected_ndim
    if len(content) < header_size:
        raise DataError(
            path, f"truncated: {len(content)} bytes, shorter than the idx header", _FETCH_HINT
        )
    zero_bytes, dtype_code, ndim = content[:2], content[2], content[3]
    if zero_bytes != b"\x00\x00" or dtype_code != _IDX_UNSIGNED_BYTE or ndim != expected_ndim:
        magic = int.from_bytes(content[:4], "big")
        expected_magic = (_IDX_UNSIGNED_BYTE << 8) | expected_ndim
        raise DataError(
            path,
            f"wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned-byte idx file with {expected_ndim} dimensions)",
            _FETCH_HINT,
        )
    shape = tuple(
        int.from_bytes(content[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(ndim)
    )
    payload = memoryview(content)[header_size:]
    expected_size = int(np.prod(shape))
    if len(payload) != expected_size:
        raise DataError(
            path,
            f"header declares shape {shape} ({expected_size} bytes) but the file holds "
            f"{len(payload)} bytes after the header",
            _FETCH_HINT,
        )
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def read_fashion_mnist(raw_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read both Fashion-MNIST splits from ``raw_dir``.

    Args:
        raw_dir: folder holding the four ``*-ubyte.gz`` files.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}`` with images uint8 of
        shape (N, 28, 28, 1) (read-only views of the decompressed bytes) and labels
        int64 in [0, 10).

    Raises:
        DataError: naming the file that is missing or corrupt, or whose images and
            labels disagree.
    """
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images = read_idx_file(raw_dir / images_name, expected_ndim=3)
        labels = read_idx_file(raw_dir / labels_name, expected_ndim=1)
        if images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
            raise DataError(
                raw_dir / images_name,
                f"images are {images.shape[1:]}, expected {(_IMAGE_SIDE, _IMAGE_SIDE)}",
            )
        if len(images) != len(labels):
            raise DataError(
                raw_dir / labels_name,
                f"{len(labels)} labels for {len(images)} images in {images_name}",
            )
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DataError(
                raw_dir / labels_name,
                f"label {labels.max()} out of range for {len(FASHION_MNIST_CLASSES)} classes",
            )
        splits[split] = (images[..., np.newaxis], labels.astype(np.int64))
    return splits
