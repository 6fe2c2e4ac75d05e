"""Manifests: one table row per example, the input of data validation.

Column contract. Every manifest has the :data:`COMMON_COLUMNS`
(``split, index, label, label_name, content_hash``); each modality adds its own
columns and describes them with a :class:`ManifestSchema`, which tells validation
which columns must exist, which give an example's size (0 = empty record), which one
is 0 for a constant record, which flags a valid record must have, and whose
distributions must agree between splits: :data:`IMAGE_MANIFEST_SCHEMA`,
:data:`TEXT_MANIFEST_SCHEMA` and :data:`AUDIO_MANIFEST_SCHEMA`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tlflax.data.errors import DataError
from tlflax.data.tfds_audio import to_pcm16

COMMON_COLUMNS: tuple[str, ...] = ("split", "index", "label", "label_name", "content_hash")


@dataclass(frozen=True)
class ManifestSchema:
    """What validation needs to know about a modality's manifest columns.

    Attributes:
        columns: every column the manifest must have (common ones included).
        size_columns: columns that must be >= 1 for a non-empty record.
        variation_column: column that is 0 for a constant (blank) record, or None.
        distribution_columns: numeric features compared between splits.
        required_flags: (boolean column, the value every valid record has) pairs.
    """

    columns: tuple[str, ...]
    size_columns: tuple[str, ...]
    variation_column: str | None
    distribution_columns: tuple[str, ...]
    required_flags: tuple[tuple[str, bool], ...] = ()


IMAGE_MANIFEST_SCHEMA = ManifestSchema(
    columns=(
        *COMMON_COLUMNS,
        "height",
        "width",
        "channels",
        "mean_intensity",
        "std_intensity",
    ),
    size_columns=("height", "width", "channels"),
    variation_column="std_intensity",
    distribution_columns=("mean_intensity", "std_intensity"),
)

TEXT_MANIFEST_SCHEMA = ManifestSchema(
    columns=(
        *COMMON_COLUMNS,
        "text_length",
        "token_count",
        "is_empty",
        "valid_utf8",
    ),
    # An empty string has no characters, but a blank one has: `is_empty` covers both.
    size_columns=(),
    variation_column=None,
    distribution_columns=("text_length", "token_count"),
    required_flags=(("is_empty", False), ("valid_utf8", True)),
)

# What the audio reader measured of each clip's source file (tlflax.data.audio_folder's
# FACT_COLUMNS; listed here so that validation need not import the reader).
AUDIO_FACT_COLUMNS: tuple[str, ...] = (
    "path",
    "source_sample_rate",
    "source_channels",
    "source_seconds",
    "peak_amplitude",
    "rms_amplitude",
    "is_silent",
    "clipped_fraction",
    "cropped_fraction",
    "padding_fraction",
)

# Silence and clipping have their own checks (validation_plan), with thresholds of their own.
AUDIO_MANIFEST_SCHEMA = ManifestSchema(
    columns=(*COMMON_COLUMNS, *AUDIO_FACT_COLUMNS),
    size_columns=("source_channels",),
    variation_column=None,
    distribution_columns=("source_seconds", "rms_amplitude"),
)

# The schema of each modality's manifest (see `image_manifest`, `text_manifest`,
# `audio_manifest`).
MANIFEST_SCHEMAS: dict[str, ManifestSchema] = {
    "image": IMAGE_MANIFEST_SCHEMA,
    "text": TEXT_MANIFEST_SCHEMA,
    "audio": AUDIO_MANIFEST_SCHEMA,
}

# Rows per chunk for the pixel statistics: bounds the float64 temporaries to ~25 MB
# for 28x28 images instead of one copy of the whole split.
_STATISTICS_CHUNK_ROWS = 4096


def content_hash(record: np.ndarray) -> str:
    """SHA-1 of a record's raw bytes (C order): equal records, equal hashes, on any machine."""
    return hashlib.sha1(np.ascontiguousarray(record).tobytes()).hexdigest()


def text_content_hash(text: str | bytes) -> str:
    """SHA-1 of a text's UTF-8 bytes (of the bytes themselves when given bytes)."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogatepass")
    return hashlib.sha1(raw).hexdigest()


def audio_content_hash(clip: np.ndarray) -> str:
    """SHA-1 of a clip's 16-bit PCM, as stored: clips that store the same, hash the same."""
    return content_hash(to_pcm16(clip))


def duplicate_records(hashes: Sequence[str], reference_hashes: Sequence[str] = ()) -> np.ndarray:
    """Which records repeat an earlier record or occur in a reference set, by content hash.

    Deduplicating a training pool with ``reference_hashes`` = the test split's hashes keeps
    one copy of each repeated record and none of those the test split also holds.

    Returns:
        A boolean mask over ``hashes``: True for the records to drop.
    """
    reference = set(reference_hashes)
    seen: set[str] = set()
    drop = np.zeros(len(hashes), dtype=bool)
    for position, record_hash in enumerate(hashes):
        drop[position] = record_hash in seen or record_hash in reference
        seen.add(record_hash)
    return drop


def _label_names(labels: np.ndarray, class_names: Sequence[str]) -> list[str | None]:
    # A label outside the class list gets no name instead of an exception: the manifest
    # exists to let validation report such records by split and index.
    return [class_names[label] if 0 <= label < len(class_names) else None for label in labels]


def _pixel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = images.reshape(len(images), -1)
    means = np.empty(len(images))
    stds = np.empty(len(images))
    for start in range(0, len(images), _STATISTICS_CHUNK_ROWS):
        chunk = flat[start : start + _STATISTICS_CHUNK_ROWS].astype(np.float64)
        means[start : start + len(chunk)] = chunk.mean(axis=1)
        stds[start : start + len(chunk)] = chunk.std(axis=1)
    return means, stds


def image_manifest(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], class_names: Sequence[str]
) -> pd.DataFrame:
    """Describe every image of every split, one row each.

    Args:
        splits: split name -> (images (N, H, W, C), integer labels (N,)).
        class_names: label ``i`` is ``class_names[i]``.

    Returns:
        A DataFrame with the columns of :data:`IMAGE_MANIFEST_SCHEMA`, in that order:
        split, index (position within the split), label, label_name (None when the
        label is out of range), content_hash (SHA-1 of the pixel bytes), height, width,
        channels, and mean_intensity / std_intensity in pixel units of the stored dtype.

    Raises:
        DataError: naming the split whose images are not 4-D or whose label count differs.
    """
    frames = []
    for split, (images, labels) in splits.items():
        if images.ndim != 4 or len(labels) != len(images):
            raise DataError(
                f"split {split!r}",
                f"need images (N, H, W, C) and N labels, got {images.shape} and {len(labels)} labels",
            )
        labels = np.asarray(labels, dtype=np.int64)
        means, stds = _pixel_statistics(images)
        _, height, width, channels = images.shape
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "index": np.arange(len(images), dtype=np.int64),
                    "label": labels,
                    "label_name": _label_names(labels, class_names),
                    "content_hash": [content_hash(image) for image in images],
                    "height": height,
                    "width": width,
                    "channels": channels,
                    "mean_intensity": means,
                    "std_intensity": stds,
                },
                columns=list(IMAGE_MANIFEST_SCHEMA.columns),
            )
        )
    if not frames:
        return pd.DataFrame(columns=list(IMAGE_MANIFEST_SCHEMA.columns))
    return pd.concat(frames, ignore_index=True)


def _decode_text(text: str | bytes) -> tuple[str, bool]:
    """The text to measure, and whether it is valid UTF-8 (invalid bytes read as U+FFFD)."""
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8"), True
        except UnicodeDecodeError:
            return text.decode("utf-8", errors="replace"), False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates, e.g. from a surrogateescape decode
        return text.encode("utf-8", errors="replace").decode("utf-8"), False
    return text, True


def text_manifest(
    splits: dict[str, tuple[Sequence[str | bytes], np.ndarray]],
    class_names: Sequence[str],
    *,
    count_tokens: Callable[[Sequence[str]], np.ndarray],
) -> pd.DataFrame:
    """Describe every text of every split, one row each.

    Args:
        splits: split name -> (texts (N,) as str or raw bytes, integer labels (N,)).
        class_names: label ``i`` is ``class_names[i]``.
        count_tokens: the model's tokenizer, counting the tokens of each text untruncated.

    Returns:
        A DataFrame with the columns of :data:`TEXT_MANIFEST_SCHEMA`, in that order:
        split, index, label, label_name (None when the label is out of range),
        content_hash (SHA-1 of the UTF-8 bytes), text_length (characters), token_count,
        is_empty (nothing but whitespace) and valid_utf8.

    Raises:
        DataError: naming the split whose label count differs from its text count.
    """
    frames = []
    for split, (texts, labels) in splits.items():
        if len(labels) != len(texts):
            raise DataError(f"split {split!r}", f"{len(texts)} texts but {len(labels)} labels")
        labels = np.asarray(labels, dtype=np.int64)
        decoded, valid = zip(*map(_decode_text, texts), strict=True) if len(texts) else ((), ())
        frames.append(
            pd.DataFrame(
                {
                    "split": split,
                    "index": np.arange(len(texts), dtype=np.int64),
                    "label": labels,
                    "label_name": _label_names(labels, class_names),
                    "content_hash": [text_content_hash(text) for text in texts],
                    "text_length": np.array([len(text) for text in decoded], dtype=np.int64),
                    "token_count": np.asarray(count_tokens(list(decoded)), dtype=np.int64),
                    "is_empty": np.array([not text.strip() for text in decoded], dtype=bool),
                    "valid_utf8": np.array(valid, dtype=bool),
                },
                columns=list(TEXT_MANIFEST_SCHEMA.columns),
            )
        )
    if not frames:
        return pd.DataFrame(columns=list(TEXT_MANIFEST_SCHEMA.columns))
    return pd.concat(frames, ignore_index=True)


def audio_manifest(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    facts: dict[str, pd.DataFrame],
    class_names: Sequence[str],
) -> pd.DataFrame:
    """Describe every clip of every split, one row each.

    Args:
        splits: split name -> (float32 clips (N, samples), integer labels (N,)).
        facts: split name -> the reader's facts of its clips (:data:`AUDIO_FACT_COLUMNS`,
            row i describing clip i): measured on the source file, before resampling.
        class_names: label ``i`` is ``class_names[i]``.

    Returns:
        A DataFrame with the columns of :data:`AUDIO_MANIFEST_SCHEMA`, in that order:
        split, index, label, label_name (None when the label is out of range),
        content_hash (SHA-1 of the stored 16-bit PCM), then the facts: path, the source's
        sample rate, channels and duration in seconds, the peak and RMS amplitude of its
        mono mix (1.0 = full scale), is_silent, and the fractions clipped, cropped off and
        padded.

    Raises:
        DataError: naming the split whose clips, labels and facts differ in number.
    """
    frames = []
    for split, (clips, labels) in splits.items():
        split_facts = facts[split]
        if not len(clips) == len(labels) == len(split_facts):
            raise DataError(
                f"split {split!r}",
                f"{len(clips)} clips but {len(labels)} labels and {len(split_facts)} facts",
            )
        labels = np.asarray(labels, dtype=np.int64)
        common = pd.DataFrame(
            {
                "split": split,
                "index": np.arange(len(clips), dtype=np.int64),
                "label": labels,
                "label_name": _label_names(labels, class_names),
                "content_hash": [audio_content_hash(clip) for clip in clips],
            },
            columns=list(COMMON_COLUMNS),
        )
        described = split_facts.loc[:, list(AUDIO_FACT_COLUMNS)].reset_index(drop=True)
        frames.append(pd.concat([common, described], axis=1))
    if not frames:
        return pd.DataFrame(columns=list(AUDIO_MANIFEST_SCHEMA.columns))
    return pd.concat(frames, ignore_index=True)


def class_counts(manifest: pd.DataFrame, split: str, class_names: Sequence[str]) -> pd.Series:
    """Records per class name in ``split``, for every name in ``class_names`` (0 if absent)."""
    in_split = manifest.loc[manifest["split"] == split, "label_name"]
    return in_split.value_counts().reindex(list(class_names), fill_value=0)


def cross_split_matches(manifest: pd.DataFrame, split: str, other_split: str) -> pd.DataFrame:
    """Records of ``split`` whose content also occurs in ``other_split`` (train/test leakage).

    Returns:
        One row per such record: ``index`` (in ``split``) and ``other_index`` (the first
        record of ``other_split`` with the same content hash), ordered by ``index``.
    """
    rows = manifest.loc[manifest["split"] == split, ["index", "content_hash"]]
    other = manifest.loc[manifest["split"] == other_split, ["index", "content_hash"]]
    first_in_other = other.drop_duplicates("content_hash").rename(columns={"index": "other_index"})
    matches = rows.merge(first_in_other, on="content_hash", how="inner")
    return matches[["index", "other_index"]].sort_values("index", ignore_index=True)
