"""The errors of reading a stored split, named by its file: shared by whole-split reading
(:mod:`tlflax.data.tfds_store`) and reading on demand (:mod:`tlflax.data.streaming`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlflax.data.errors import DataError


def first_line(error: BaseException) -> str:
    """The first line of an error's message, at most 300 characters."""
    return (str(error).strip().splitlines() or [""])[0][:300]


def split_file(version_dir: Path, split: str) -> Path:
    """The ``array_record`` file of ``split`` (a pattern when there is none): what errors name."""
    files = sorted(path.name for path in version_dir.glob(f"*-{split}.array_record*"))
    return version_dir / (files[0] if files else f"*-{split}.array_record*")


def unreadable_split(location: Path, split: str, error: BaseException) -> DataError:
    """The error for a split file that array_record cannot open or read (a RuntimeError)."""
    return DataError(
        location,
        f"split {split!r} cannot be read ({first_line(error)})",
        "run the `prepare` stage again",
    )


def check_record(location: Path, split: str, position: int, count: int, record: Any) -> None:
    """Refuse a record past the end of a truncated file: it comes back None or all None."""
    if record is None or any(value is None for value in record.values()):
        raise DataError(
            location,
            f"split {split!r}: record {position} of {count} cannot be read "
            "(the file is truncated or damaged)",
            "run the `prepare` stage again",
        )
