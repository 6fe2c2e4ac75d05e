"""Read a user's labelled texts from a CSV or JSONL file, or one such file per split.

Layouts::

    reviews.csv | reviews.jsonl                 read_text_file(path, ...)
    folder/{train,test[,validation]}.{csv,jsonl}
                                                read_text_file_splits(folder, ...)

A CSV file has a header row naming its columns; a JSONL file holds one JSON object per
line. The text and label columns are named by the caller (they come from params). Files
must be UTF-8 (a byte-order mark is allowed). Every refusal is a
:class:`~tlflax.data.errors.DataError` naming the file and the line of the record: bytes
that are not UTF-8, a missing column, an empty text, a missing or unknown label, a
malformed row. Data-quality problems of readable files (imbalance, duplicates, leakage,
too few examples of a class) are left to validation (:mod:`tlflax.validation`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlflax.data.errors import DataError
from tlflax.data.local_files import find_splits

TEXT_FILE_SUFFIXES: tuple[str, ...] = (".csv", ".jsonl")

# split -> (texts, labels int64 (N,))
TextSplits = dict[str, tuple[list[str], np.ndarray]]


def _decode_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        # utf-8-sig: spreadsheet programs often start a CSV with a byte-order mark.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(
            f"{path}, line {line}",
            f"byte {raw[error.start : error.start + 1]!r} at offset {error.start} is not UTF-8",
            "save the file as UTF-8",
        ) from None


def _csv_records(path: Path, content: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line where the record starts, column -> value) for each data row of a CSV file."""
    # strict: a stray or unterminated quote is an error, not a text swallowing the rows after it.
    reader = csv.DictReader(io.StringIO(content, newline=""), strict=True)
    next_line = 1  # where the record being read starts
    try:
        columns = reader.fieldnames or []
        next_line = reader.line_num + 1
        for row in reader:
            if None in row:  # DictReader files surplus values under the key None
                raise DataError(
                    f"{path}, line {next_line}",
                    f"row has {len(columns) + len(row[None])} values but the header names "
                    f"{len(columns)} columns",
                    "quote texts that contain commas",
                )
            yield next_line, row
            next_line = reader.line_num + 1
    except csv.Error as error:
        raise DataError(f"{path}, line {next_line}", f"malformed CSV: {error}") from None


def _jsonl_records(path: Path, content: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    # Split on "\n" only: str.splitlines also breaks at U+2028 and the like, which JSON
    # allows unescaped inside strings.
    for line_number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {line_number}", f"not valid JSON: {error}") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}, line {line_number}",
                f"expected a JSON object, got {type(record).__name__}",
            )
        yield line_number, record


def record_field(record: dict[str, Any], column: str, location: str) -> str | None:
    """The record's value of ``column`` as text; None when the value is absent.

    Raises:
        DataError: naming ``location`` when the record has no ``column``, or its value is
            neither text nor a number.
    """
    if column not in record:
        raise DataError(
            location, f"has no column {column!r}; columns present: {sorted(map(str, record))}"
        )
    value = record[column]
    if value is None or isinstance(value, str):
        return value
    # JSON numbers are fine as labels ("1"); objects, lists and booleans are no text.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise DataError(location, f"{column!r} must be a string, got {type(value).__name__}")


def read_text_file(
    path: Path,
    *,
    text_column: str,
    label_column: str,
    classes: Sequence[str] | None = None,
) -> tuple[list[str], np.ndarray, list[str]]:
    """Read the labelled texts of one CSV or JSONL file (chosen by its extension).

    Args:
        path: a ``.csv`` (with a header row) or ``.jsonl`` file, UTF-8.
        text_column: the column (CSV) or key (JSONL) holding each text.
        label_column: the column or key holding each label (a string; JSON numbers
            are read as their text, e.g. ``1`` -> ``"1"``).
        classes: the label names, in label-id order; a label outside them is refused.
            None takes the sorted distinct labels of the file, which must be at least two.

    Returns:
        ``(texts, labels int64 (N,), class_names)`` in file order.

    Raises:
        DataError: naming the file and line: bytes that are not UTF-8, a missing column
            (listing the columns present), an empty or blank text, a missing or unknown
            label, a malformed row, no records, fewer than two classes.
    """
    records = file_records(path, text_column, label_column)
    texts, label_names = [], []
    for line, record in records:
        location = f"{path}, line {line}"
        text = record_field(record, text_column, location)
        label = record_field(record, label_column, location)
        if text is None or not text.strip():
            raise DataError(location, f"empty text in column {text_column!r}")
        if label is None or not label.strip():
            raise DataError(location, f"missing label in column {label_column!r}")
        if classes is not None and label not in classes:
            raise DataError(location, f"unknown label {label!r}; the classes are {list(classes)}")
        texts.append(text)
        label_names.append(label)
    if not texts:
        raise DataError(path, "holds no records")
    labels, class_names = label_ids(path, label_names, classes)
    return texts, labels, class_names


def file_records(path: Path, *columns: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, column -> value) for each record of a CSV or JSONL file (by its extension).

    Shared with the audio lists (:mod:`tlflax.data.audio_folder`).

    Raises:
        DataError: naming ``path`` when its type is not CSV or JSONL, it is missing, not
            UTF-8, or (CSV) its header lacks one of ``columns``; records that cannot be
            parsed are named by file and line as they are read.
    """
    if path.suffix.lower() not in TEXT_FILE_SUFFIXES:
        raise DataError(path, f"unsupported file type (expected {', '.join(TEXT_FILE_SUFFIXES)})")
    if not path.is_file():
        raise DataError(path, "file not found")
    content = _decode_utf8(path)
    if path.suffix.lower() == ".csv":
        header = next(csv.reader(io.StringIO(content, newline="")), [])
        for column in columns:
            if column not in header:
                raise DataError(path, f"has no column {column!r}; columns present: {header}")
        return _csv_records(path, content)
    return _jsonl_records(path, content)


def label_ids(
    path: Path, label_names: list[str], classes: Sequence[str] | None
) -> tuple[np.ndarray, list[str]]:
    """(label id of each label name, class names): ``classes``, or the labels seen, sorted.

    Raises:
        DataError: naming ``path`` when there are fewer than two class names.
    """
    class_names = list(classes) if classes is not None else sorted(set(label_names))
    if len(class_names) < 2:
        raise DataError(
            path,
            f"needs at least 2 classes to classify, found {class_names}",
            "list the classes in params if this file holds only some of them",
        )
    index = {name: position for position, name in enumerate(class_names)}
    return np.array([index[name] for name in label_names], dtype=np.int64), class_names


def read_text_file_splits(
    folder: Path,
    *,
    text_column: str,
    label_column: str,
    classes: Sequence[str] | None = None,
) -> tuple[TextSplits, list[str]]:
    """Read ``folder/{train,test[,validation]}.{csv,jsonl}``, one file per split.

    Args:
        folder: holds ``train`` and ``test`` files, optionally ``validation``, and nothing
            else (another file is refused, not skipped).
        text_column, label_column: as for :func:`read_text_file`.
        classes: the label names; None takes train's sorted distinct labels, and a label
            of another split that train lacks is then refused as unknown.

    Returns:
        ``({split: (texts, labels int64 (N,))}, class_names)``.

    Raises:
        DataError: as :func:`read_text_file`, naming the split file; or naming ``folder``
            when a required split file is missing.
    """
    files = find_splits(folder, TEXT_FILE_SUFFIXES)
    columns = {"text_column": text_column, "label_column": label_column}
    texts, labels, class_names = read_text_file(files["train"], **columns, classes=classes)
    splits = {"train": (texts, labels)}
    for split, path in files.items():
        if split != "train":
            texts, labels, _ = read_text_file(path, **columns, classes=class_names)
            splits[split] = (texts, labels)
    return splits, class_names
