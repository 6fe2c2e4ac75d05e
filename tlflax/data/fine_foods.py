"""Amazon fine-food reviews (``small_fine_foods`` from the R package modeldata) as DataFrames.

Debian's ``r-cran-modeldata`` ships the data as an R lazy-load database: ``Rdata.rdx`` (a
serialized R list saying where each object lies) and ``Rdata.rdb`` (the objects, each one
serialized and compressed on its own). This module reads the index, cuts out the
``training_data`` and ``testing_data`` blobs, decompresses them as their headers say and
lets the PyPI ``rdata`` package turn the serialized tibbles into pandas frames.

Facts of modeldata 1.1.0: 4000 training reviews (2600 great / 1400 other) and 1000 test
reviews (658 / 342); every review belongs to a different product (the product ids are
10-character ASIN codes), train and test share no product; reviews are 50-8055 characters
(median ~277), contain HTML (``<br />`` in ~23%, a few entities such as ``&eacute;``) and,
in 12 reviews, U+FFFD replacement characters that were already in the upstream bytes.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import rdata

from tlflax.errors import InputError

FINE_FOODS_CLASSES = ["great", "other"]
# Split name → the object's name in the modeldata lazy-load database.
_SPLIT_OBJECTS = {"train": "training_data", "test": "testing_data"}
_COLUMNS = ["product", "review", "label"]

# R's lazy-load blobs (R_compress2/3 in serialize.c): a 4-byte big-endian uncompressed
# length, one type byte, then the payload; 'Z' is a raw LZMA2 stream (no .xz container).
_DECOMPRESSORS: dict[bytes, Callable[[bytes, int], bytes]] = {
    # A raw stream does not record its dictionary size; one as large as the output (never
    # smaller than LZMA's 4 KiB minimum) decodes whatever preset R compressed with.
    b"Z": lambda payload, length: lzma.decompress(
        payload,
        format=lzma.FORMAT_RAW,
        filters=[{"id": lzma.FILTER_LZMA2, "dict_size": max(length, 4096)}],
    ),
    b"2": lambda payload, _: bz2.decompress(payload),
    b"1": lambda payload, _: zlib.decompress(payload),
    b"0": lambda payload, _: bytes(payload),
}


class FineFoodsDataError(InputError):
    """A modeldata file is missing, corrupt or does not hold the expected data; names the file."""


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise FineFoodsDataError(
            f"{path} not found; it comes from Debian's r-cran-modeldata (usr/lib/R/site-library/"
            "modeldata/data/)"
        )
    return path


def _read_index(index_path: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Object name → (offset, length) in the .rdb, and the database's compression kind."""
    try:
        index = rdata.conversion.convert(rdata.parser.parse_file(index_path, extension=".rds"))
        locations = {
            str(name): (int(offset), int(length))
            for name, (offset, length) in index["variables"].items()
        }
        compression = int(np.asarray(index["compressed"]).item())
    except Exception as error:  # rdata raises many kinds of error on a bad file
        raise FineFoodsDataError(
            f"{index_path} is not a readable R lazy-load index: {error}"
        ) from error
    return locations, compression


def _decompress_blob(blob: bytes, compression: int) -> bytes:
    """One object's serialized bytes from its compressed blob in the .rdb."""
    expected_length = struct.unpack(">I", blob[:4])[0]
    if compression == 1:  # R_compress1: zlib, no type byte
        serialized = zlib.decompress(blob[4:])
    else:
        serialized = _DECOMPRESSORS[blob[4:5]](blob[5:], expected_length)
    if len(serialized) != expected_length:
        raise ValueError(f"decompressed {len(serialized)} bytes, header says {expected_length}")
    return serialized


def _read_object(database_path: Path, location: tuple[int, int], compression: int) -> object:
    offset, length = location
    with database_path.open("rb") as database:
        database.seek(offset)
        blob = database.read(length)
    try:
        serialized = _decompress_blob(blob, compression)
        # A tibble is a data.frame with extra classes; naming them avoids rdata's warnings.
        constructors = {
            **rdata.conversion.DEFAULT_CLASS_MAP,
            "tbl_df": rdata.conversion.DEFAULT_CLASS_MAP["data.frame"],
        }
        return rdata.conversion.convert(
            rdata.parser.parse_data(serialized, extension=".rds"), constructors
        )
    except Exception as error:  # lzma/zlib/bz2/rdata/KeyError on a corrupt blob
        raise FineFoodsDataError(
            f"{database_path} is corrupt at bytes {offset}..{offset + length}: "
            f"{type(error).__name__}: {error}"
        ) from error


def _to_reviews_frame(table: object, source: Path, name: str) -> pd.DataFrame:
    """Check one tibble and give it the columns product, review, label (plain strings)."""
    if not isinstance(table, pd.DataFrame) or not {"product", "review", "score"} <= set(table):
        raise FineFoodsDataError(f"{source}: {name} is not a table of product, review, score")
    if table[["product", "review", "score"]].isna().any().any():
        raise FineFoodsDataError(f"{source}: {name} has missing values")
    frame = pd.DataFrame(
        {
            "product": table["product"].astype(str).to_numpy(),
            "review": table["review"].astype(str).to_numpy(),
            "label": table["score"].astype(str).to_numpy(),
        }
    )
    unknown = set(frame["label"]) - set(FINE_FOODS_CLASSES)
    if unknown:
        raise FineFoodsDataError(f"{source}: {name} has unknown labels {sorted(unknown)}")
    # rdata has already decoded the R strings; a lone surrogate would still fail to encode.
    for review in frame["review"]:
        review.encode("utf-8")
    return frame


def read_fine_foods(raw_dir: Path) -> dict[str, pd.DataFrame]:
    """Read ``small_fine_foods`` from modeldata's ``Rdata.rdx`` + ``Rdata.rdb`` in ``raw_dir``.

    Returns:
        ``{"train": 4000 rows, "test": 1000 rows}``, each with string columns ``product``,
        ``review`` and ``label`` (one of :data:`FINE_FOODS_CLASSES`) and a 0..N-1 index.

    Raises:
        FineFoodsDataError: A file is missing, corrupt, or lacks the expected tables; the
            message names the file.
    """
    raw_dir = Path(raw_dir)
    index_path = _existing_file(raw_dir / "Rdata.rdx")
    database_path = _existing_file(raw_dir / "Rdata.rdb")
    locations, compression = _read_index(index_path)
    frames = {}
    for split, name in _SPLIT_OBJECTS.items():
        if name not in locations:
            raise FineFoodsDataError(f"{index_path} has no object {name!r} (small_fine_foods)")
        table = _read_object(database_path, locations[name], compression)
        frames[split] = _to_reviews_frame(table, database_path, name)
    return frames


def split_by_product(
    frame: pd.DataFrame, validation_products: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out all reviews of ``validation_products`` randomly chosen products.

    A validation set of unseen products measures generalisation the way the test split
    does (it shares no product with train). The choice depends only on the set of products
    and ``seed``, not on row order.

    Returns:
        (train_frame, validation_frame), disjoint in products, each with a fresh index.
    """
    products = np.sort(frame["product"].unique())
    if not 0 < validation_products < len(products):
        raise ValueError(
            f"validation_products must be in 1..{len(products) - 1} (there are "
            f"{len(products)} products), got {validation_products}"
        )
    held_out = np.random.default_rng(seed).choice(products, validation_products, replace=False)
    is_validation = frame["product"].isin(held_out).to_numpy()
    return (
        frame[~is_validation].reset_index(drop=True),
        frame[is_validation].reset_index(drop=True),
    )


def split_stratified(
    frame: pd.DataFrame, validation_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``validation_fraction`` of each label's rows, chosen at random.

    Returns:
        (train_frame, validation_frame) with the label proportions of ``frame``, each with a
        fresh index and rows in their original order.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    generator = np.random.default_rng(seed)
    is_validation = np.zeros(len(frame), dtype=bool)
    for label in sorted(frame["label"].unique()):
        rows = np.flatnonzero(frame["label"].to_numpy() == label)
        count = round(validation_fraction * len(rows))
        is_validation[generator.choice(rows, count, replace=False)] = True
    return (
        frame[~is_validation].reset_index(drop=True),
        frame[is_validation].reset_index(drop=True),
    )
