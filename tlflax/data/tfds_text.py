"""Store in-memory text datasets as real TFDS datasets, without TensorFlow.

The text counterpart of :func:`tlflax.data.tfds_store.write_image_dataset`, on the same
builder: features ``text`` (``tfds.features.Text``, stored as UTF-8) and ``label``
(``ClassLabel``), ``array_record`` files, read back through data sources. Text features
need no TensorFlow on this path (checked by the tests: ``tensorflow`` is never imported).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from tlflax.data.errors import DataError
from tlflax.data.tfds_store import check_labels, read_columns, write_dataset


def write_text_dataset(
    data_dir: Path,
    name: str,
    splits: dict[str, tuple[Sequence[str], np.ndarray]],
    class_names: Sequence[str],
    description: str = "",
) -> Path:
    """Write text splits as a TFDS ``array_record`` dataset, replacing any previous one.

    Empty texts are stored as they are: reporting them is the job of validation, which
    needs the dataset to exist. Texts that cannot be encoded as UTF-8 (lone surrogates)
    cannot be stored at all and are refused here, by record.

    Args:
        data_dir: the TFDS data directory (created if missing).
        name: dataset name, lowercase snake_case (also the folder name).
        splits: split name -> (texts (N,), integer labels (N,)).
        class_names: label names; label ``i`` is ``class_names[i]``.
        description: free text stored in ``dataset_info.json``.

    Returns:
        ``data_dir / name``, the folder that was replaced.

    Raises:
        DataError: naming the split whose labels are malformed, or the record
            (``split[index]``) that is not a UTF-8-encodable string.
    """
    for split, (texts, labels) in splits.items():
        check_labels(
            f"dataset {name!r}, split {split!r}", np.asarray(labels), len(texts), len(class_names)
        )
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise DataError(f"{split}[{index}]", f"text must be str, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise DataError(
                    f"{split}[{index}]", f"text is not valid Unicode ({error.reason})"
                ) from None
    features = {
        "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(names=list(class_names)),
    }
    columns = {
        split: {"text": list(texts), "label": np.asarray(labels)}
        for split, (texts, labels) in splits.items()
    }
    return write_dataset(
        data_dir,
        name,
        features,
        columns,
        supervised_keys=("text", "label"),
        description=description,
    )


def read_text_split(data_dir: Path, name: str, split: str) -> tuple[list[str], np.ndarray]:
    """Load one split of a dataset written by :func:`write_text_dataset` into memory.

    Returns:
        ``(texts, labels int64 (N,))`` in the order they were written.

    Raises:
        DataError: naming the dataset folder when it or the split is missing or damaged.
    """
    columns = read_columns(data_dir, name, split)
    texts = [raw.decode("utf-8") for raw in columns["text"]]
    return texts, np.asarray(columns["label"], dtype=np.int64)
