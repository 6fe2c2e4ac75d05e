"""Read a user's labelled audio clips into one float32 waveform array of fixed length.

Layouts::

    root/<class>/[<sub-folders>/]<clip>           read_audio_folder(root)
    clips.csv | clips.jsonl  with columns path, label
                                                  read_audio_list(path)
    root/{train,test[,validation]}/<class>/...
    root/{train,test[,validation]}.{csv,jsonl}    read_audio_splits(root)

Class names are the sorted class-folder names (or the sorted labels of the list); label
``i`` is ``class_names[i]``. Sub-folders of a class folder are read too (recorded prompts
often ship sorted into ``digits/``, ``letters/``, ...). Clips are ordered by path in a
folder, by row in a list; list paths are relative to the list's folder.

Every clip is decoded with ``soundfile`` (WAV, FLAC, AIFF), averaged to mono, resampled
(:func:`resample`, exact rational ratio) to
:attr:`ClipSettings.sample_rate` and cropped or padded (:attr:`ClipSettings.padding`) to
:attr:`ClipSettings.clip_seconds`, so all clips stack into one array the TFDS store and the
log-mel front end (:mod:`tlflax.audio`) take. Alongside come per-clip facts for a
data-quality gate (:data:`FACT_COLUMNS`): the source's rate, channels and duration, and
its peak, RMS, silence and clipping, measured before resampling, which would blur them.

Every refusal is a :class:`~tlflax.data.errors.DataError` naming the file (and the list's
line): a missing folder or file, an unknown extension, an empty, corrupt or non-audio
file, a clip without samples or with NaN/infinite ones, a link leading outside the root,
an unknown label, fewer than two classes. Quality problems of readable clips (silence,
clipping, imbalance) are left to validation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import soundfile
from scipy.signal import firwin, resample_poly

from tlflax.data.errors import DataError
from tlflax.data.local_files import find_splits, resolve_inside, visible_entries
from tlflax.data.text_file import TEXT_FILE_SUFFIXES, file_records, label_ids, record_field

AUDIO_SUFFIXES: tuple[str, ...] = (".aif", ".aiff", ".flac", ".wav")
# Containers libsndfile may report for those suffixes (it detects the format from the
# content); anything else it can read (OGG, MP3, raw formats) is refused by name.
_SOUNDFILE_FORMATS = frozenset({"AIFF", "FLAC", "RF64", "W64", "WAV", "WAVEX"})
# The resampling filter (:func:`resample`): a Kaiser-windowed sinc (beta 12), 64 taps per polyphase branch
# each side, cut at 97% of the lower Nyquist frequency: flat to 90% of it (2e-5 dB), -3 dB
# at 96%, below -117 dB from 103%. scipy's default (10 taps, beta 5, cut at Nyquist) lets
# ~2e-5 of a clip's energy through just past the lower Nyquist, which log10(1 + 10000 x)
# turns into bands up to 2.6 away from librosa.load's (soxr "HQ"); this filter stays within
# 6e-4 of it below 3.5 kHz on the 8 kHz prompts, at ~5 ms per 3 s clip from 44.1 kHz.
_FILTER_TAPS_PER_PHASE = 64
_FILTER_CUTOFF = 0.97
_FILTER_KAISER_BETA = 12.0
# -60 dBFS: quieter than room noise in a recording, so a clip this quiet holds no signal.
SILENCE_RMS = 10 ** (-60 / 20)
# The largest 16-bit sample as a float: a sample at or beyond it was clipped (or is
# about to be) by the recording chain.
FULL_SCALE = 32767 / 32768

FACT_COLUMNS: tuple[str, ...] = (
    "path",  # as found: relative to the dataset root or to the list's folder
    "source_sample_rate",  # Hz, as stored
    "source_channels",
    "source_seconds",  # duration as stored, before cropping or padding
    "peak_amplitude",  # largest |sample| of the mono mix, 1.0 = full scale
    "rms_amplitude",  # of the mono mix
    "is_silent",  # rms_amplitude below SILENCE_RMS (-60 dBFS)
    "clipped_fraction",  # share of frames with a channel at full scale
    "cropped_fraction",  # share of the (resampled) source cut off to fit the clip length
    "padding_fraction",  # share of the fixed-length clip that is padding
)


@dataclass(frozen=True)
class ClipSettings:
    """The one shape every clip is brought to.

    Attributes:
        sample_rate: target rate in Hz (16 kHz: the log-mel front end's default).
        clip_seconds: target length; clips are cropped or padded to it.
        align: ``"start"`` keeps a long clip's beginning and pads a short one at its end:
            speech prompts and one-shot sounds start at their onset, which a centre crop
            would cut. ``"centre"`` crops (and pads) both ends equally, for recordings
            whose middle is the most typical part (music excerpts).
        padding: what fills a short clip. ``"zeros"``: silence. ``"repeat"``: the clip
            again, looped, so a network that averages over time reads the recording
            throughout, not a mixture of it and silence in proportions set by its length.
    """

    sample_rate: int = 16000
    clip_seconds: float = 3.0
    align: Literal["start", "centre"] = "start"
    padding: Literal["zeros", "repeat"] = "zeros"

    def __post_init__(self) -> None:
        if self.align not in ("start", "centre"):
            raise ValueError(f"align must be 'start' or 'centre', got {self.align!r}")
        if self.padding not in ("zeros", "repeat"):
            raise ValueError(f"padding must be 'zeros' or 'repeat', got {self.padding!r}")
        if self.sample_rate <= 0 or self.clip_samples <= 0:
            raise ValueError(
                f"sample_rate and clip_seconds must be positive, got {self.sample_rate} "
                f"and {self.clip_seconds}"
            )

    @property
    def clip_samples(self) -> int:
        """Samples per clip: ``clip_seconds * sample_rate``, rounded."""
        return round(self.clip_seconds * self.sample_rate)


@dataclass(frozen=True)
class AudioDataset:
    """Clips of one length with their labels and per-clip facts (one row per clip)."""

    waveforms: np.ndarray  # float32 (N, clip_samples), mono, in [-1, 1] for integer sources
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    facts: pd.DataFrame  # FACT_COLUMNS, row i describes waveforms[i]


@dataclass(frozen=True)
class AudioClips:
    """Clips as ``prepare`` handles records: indexed, counted and iterated like their
    waveform array, with their facts (row i describes clip i) and sample rate alongside."""

    waveforms: np.ndarray  # float32 (N, clip_samples)
    facts: pd.DataFrame  # FACT_COLUMNS
    sample_rate: int

    def __len__(self) -> int:
        return len(self.waveforms)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.waveforms)

    def __getitem__(self, index: np.ndarray | slice) -> AudioClips:
        facts = self.facts.iloc[index].reset_index(drop=True)
        return AudioClips(self.waveforms[index], facts, self.sample_rate)


def decode_audio(path: Path, location: str | Path) -> tuple[np.ndarray, int]:
    """Decode one WAV, FLAC or AIFF file into float32 (frames, channels) and its rate.

    Integer samples are scaled to [-1, 1) (16-bit: ``value / 32768``).

    Raises:
        DataError: naming ``location`` when the file is missing, empty, not one of the
            three formats, corrupt, without samples, or holds NaN or infinite samples.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(location, "no such file") from None
    if size == 0:
        raise DataError(location, "audio file is empty (0 bytes)")
    try:
        with soundfile.SoundFile(path) as sound:
            if sound.format not in _SOUNDFILE_FORMATS:
                raise DataError(location, f"holds {sound.format} audio, not WAV, FLAC or AIFF")
            samples = sound.read(dtype="float32", always_2d=True)
            sample_rate = sound.samplerate
    except soundfile.LibsndfileError as error:
        raise DataError(
            location, f"not a readable WAV, FLAC or AIFF file ({error.error_string})"
        ) from None
    if samples.shape[0] == 0:
        raise DataError(location, "audio file holds no samples", "remove it or re-export it")
    if not np.isfinite(samples).all():
        raise DataError(location, "audio file holds NaN or infinite samples")
    return samples, sample_rate


@functools.cache
def _resampling_filter(up: int, down: int) -> np.ndarray:
    """The low-pass FIR filter for upsampling by ``up`` then downsampling by ``down``."""
    widest = max(up, down)
    taps = firwin(
        2 * _FILTER_TAPS_PER_PHASE * widest + 1,
        _FILTER_CUTOFF / widest,
        window=("kaiser", _FILTER_KAISER_BETA),
    )
    taps.flags.writeable = False  # cached and shared
    return taps


def resample(waveform: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """``waveform`` (samples,) at ``target_rate``: ``ceil(samples * target / source)`` long.

    Polyphase filtering (``scipy.signal.resample_poly``) by the exact ratio
    ``target/source`` reduced by their gcd (8 -> 16 kHz: up 2, down 1; 44.1 -> 16 kHz: up
    160, down 441): no rounded ratio drifts the timing, no FFT treats the clip as periodic
    (its end bleeding into its start), and the linear-phase filter shifts nothing in time.
    Computed in float64, returned as float32.
    """
    if source_rate == target_rate:
        return waveform.astype(np.float32)
    divisor = math.gcd(source_rate, target_rate)
    up, down = target_rate // divisor, source_rate // divisor
    resampled = resample_poly(
        waveform.astype(np.float64), up, down, window=_resampling_filter(up, down)
    )
    return resampled.astype(np.float32)


def fix_length(
    waveform: np.ndarray,
    clip_samples: int,
    align: Literal["start", "centre"] = "start",
    padding: Literal["zeros", "repeat"] = "zeros",
) -> np.ndarray:
    """``waveform`` (samples,) cropped or padded to ``clip_samples``.

    ``align="start"`` keeps the beginning and pads at the end; ``"centre"`` crops or pads
    both ends equally (the odd sample at the end). ``padding="zeros"`` pads with silence,
    ``"repeat"`` with the waveform itself, looped as often as needed (numpy's ``wrap``).
    """
    excess = waveform.shape[0] - clip_samples
    if excess >= 0:
        start = 0 if align == "start" else excess // 2
        return waveform[start : start + clip_samples]
    before = 0 if align == "start" else -excess // 2
    mode = "constant" if padding == "zeros" else "wrap"
    return np.pad(waveform, (before, -excess - before), mode=mode)


def _source_facts(samples: np.ndarray, sample_rate: int) -> dict[str, float | int | bool]:
    """Facts of a decoded clip (frames, channels), before resampling and fitting."""
    mono = samples.mean(axis=1, dtype=np.float64)
    rms = float(np.sqrt(np.mean(mono**2)))
    return {
        "source_sample_rate": sample_rate,
        "source_channels": samples.shape[1],
        "source_seconds": samples.shape[0] / sample_rate,
        "peak_amplitude": float(np.abs(mono).max()),
        "rms_amplitude": rms,
        "is_silent": rms < SILENCE_RMS,
        "clipped_fraction": float(np.mean((np.abs(samples) >= FULL_SCALE).any(axis=1))),
    }


def load_clip(
    path: Path, location: str | Path, settings: ClipSettings
) -> tuple[np.ndarray, dict[str, float | int | bool]]:
    """One file as a mono float32 clip of ``settings``' rate and length, with its facts.

    Raises:
        DataError: as :func:`decode_audio`.
    """
    samples, sample_rate = decode_audio(path, location)
    facts = _source_facts(samples, sample_rate)
    mono = resample(samples.mean(axis=1), sample_rate, settings.sample_rate)
    clip_samples = settings.clip_samples
    facts["cropped_fraction"] = max(0, mono.shape[0] - clip_samples) / mono.shape[0]
    facts["padding_fraction"] = max(0, clip_samples - mono.shape[0]) / clip_samples
    return fix_length(mono, clip_samples, settings.align, settings.padding), facts


def _audio_files(folder: Path, root: Path, seen: set[Path]) -> list[Path]:
    """The audio files under ``folder``, depth first in name order; links stay inside root."""
    files = []
    for entry in visible_entries(folder):
        resolved = resolve_inside(entry, root)
        if resolved.is_dir():
            if resolved in seen:
                raise DataError(entry, f"links to {resolved}, a folder already read")
            seen.add(resolved)
            files.extend(_audio_files(entry, root, seen))
        elif entry.suffix.lower() not in AUDIO_SUFFIXES:
            raise DataError(
                entry,
                f"not an audio file (expected {', '.join(AUDIO_SUFFIXES)})",
                "move other files out of the dataset folder",
            )
        else:
            files.append(entry)
    return files


def _assemble(
    clips: list[tuple[np.ndarray, dict]],
    paths: list[str],
    labels: np.ndarray,
    class_names: list[str],
) -> AudioDataset:
    facts = pd.DataFrame(
        [{"path": path, **fact} for path, (_, fact) in zip(paths, clips, strict=True)]
    )
    return AudioDataset(
        waveforms=np.stack([waveform for waveform, _ in clips]).astype(np.float32),
        labels=labels,
        class_names=class_names,
        facts=facts.loc[:, list(FACT_COLUMNS)],
    )


def _class_names(found: list[str], classes: Sequence[str] | None, location: Path) -> list[str]:
    """``classes``, or the sorted names ``found``: at least two, and covering ``found``."""
    class_names = list(classes) if classes is not None else sorted(found)
    if len(class_names) < 2:
        raise DataError(location, f"needs at least 2 classes to classify, found {class_names}")
    unknown = [name for name in found if name not in class_names]
    if unknown:
        raise DataError(
            location / unknown[0], f"unknown class {unknown[0]!r}; the classes are {class_names}"
        )
    return class_names


def read_audio_folder(
    root: Path, settings: ClipSettings = ClipSettings(), *, classes: Sequence[str] | None = None
) -> AudioDataset:
    """Read ``root/<class>/.../<clip>`` (WAV, FLAC, AIFF) into clips of one length.

    Args:
        root: the dataset folder; nothing outside it is read (links leading out are
            refused). Hidden files are skipped; any other non-audio file is refused.
        settings: target rate, length and crop alignment.
        classes: the class names in label order; a folder outside them is refused. None
            takes the sorted class-folder names, which must be at least two.

    Returns:
        The clips, classes in sorted folder order, files by path within each class.

    Raises:
        DataError: naming the file or folder at fault (see the module docstring).
    """
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    class_folders = {}
    for entry in visible_entries(root):
        if not resolve_inside(entry, root).is_dir():
            raise DataError(entry, "is not a class folder", "put clips in <class>/ sub-folders")
        class_folders[entry.name] = entry
    class_names = _class_names(list(class_folders), classes, root)
    files = []
    for name, folder in class_folders.items():
        found = _audio_files(folder, root, {resolve_inside(folder, root)})
        if not found:
            raise DataError(folder, "class folder holds no audio files")
        files += [(path, class_names.index(name)) for path in found]
    return read_audio_files(root, files, class_names, settings)


def read_audio_files(
    root: Path,
    files: Sequence[tuple[Path, int]],
    class_names: list[str],
    settings: ClipSettings = ClipSettings(),
) -> AudioDataset:
    """Read the clips ``files`` lists under ``root``, (path, label) each, in that order.

    Raises:
        DataError: naming the file that leads outside ``root`` or cannot be read.
    """
    clips = [load_clip(resolve_inside(path, root), path, settings) for path, _ in files]
    paths = [path.relative_to(root).as_posix() for path, _ in files]
    labels = np.array([label for _, label in files], dtype=np.int64)
    return _assemble(clips, paths, labels, class_names)


def read_audio_list(
    path: Path,
    settings: ClipSettings = ClipSettings(),
    *,
    path_column: str = "path",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
) -> AudioDataset:
    """Read the clips a CSV (with a header) or JSONL file lists with their labels.

    Args:
        path: the list, UTF-8; each record names a clip, relative to the list's folder
            (which bounds what may be read), and its label.
        settings: target rate, length and crop alignment.
        path_column, label_column: the columns (CSV) or keys (JSONL) to read.
        classes: the class names in label order; a label outside them is refused. None
            takes the sorted distinct labels, which must be at least two.

    Returns:
        The clips in the list's order.

    Raises:
        DataError: naming the list and line for a malformed record, a missing or unknown
            label, a missing clip; naming the list and line with the clip for a clip that
            cannot be read.
    """
    root = path.parent
    records = []
    for line, record in file_records(path, path_column, label_column):
        location = f"{path}, line {line}"
        clip_path = record_field(record, path_column, location)
        label = record_field(record, label_column, location)
        if not clip_path or not clip_path.strip():
            raise DataError(location, f"empty path in column {path_column!r}")
        if not label or not label.strip():
            raise DataError(location, f"missing label in column {label_column!r}")
        if classes is not None and label not in classes:
            raise DataError(location, f"unknown label {label!r}; the classes are {list(classes)}")
        records.append((location, clip_path, label))
    if not records:
        raise DataError(path, "holds no records")
    labels, class_names = label_ids(path, [label for _, _, label in records], classes)
    clips = [
        _listed_clip(root, location, clip_path, settings) for location, clip_path, _ in records
    ]
    return _assemble(clips, [clip_path for _, clip_path, _ in records], labels, class_names)


def _listed_clip(
    root: Path, location: str, clip_path: str, settings: ClipSettings
) -> tuple[np.ndarray, dict]:
    """The clip a list's record names, every error naming the record and the clip."""
    candidate = root / clip_path
    where = f"{location}: {clip_path}"
    if not candidate.is_file():
        raise DataError(
            where,
            "audio file not found" if not candidate.exists() else "is not a file",
            f"paths are relative to {root}",
        )
    if candidate.suffix.lower() not in AUDIO_SUFFIXES:
        raise DataError(where, f"not an audio file (expected {', '.join(AUDIO_SUFFIXES)})")
    try:
        resolved = resolve_inside(candidate, root)
    except DataError as error:
        raise DataError(where, error.problem, error.hint) from None
    return load_clip(resolved, where, settings)


def read_audio_splits(
    root: Path,
    settings: ClipSettings = ClipSettings(),
    *,
    path_column: str = "path",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
) -> dict[str, AudioDataset]:
    """Read ``root/{train,test[,validation]}``: class folders or lists, one per split.

    Each split is a folder read by :func:`read_audio_folder` or a ``.csv``/``.jsonl``
    list read by :func:`read_audio_list`. The classes are ``classes`` or train's; another
    split may lack a class (validation reports that) but may not add one.

    Returns:
        split -> its clips, every split with the same ``class_names``.

    Raises:
        DataError: as the readers, or naming ``root`` for a missing or unknown split.
    """
    splits = find_splits(root, ("", *TEXT_FILE_SUFFIXES))

    def read(split_path: Path, split_classes: Sequence[str] | None) -> AudioDataset:
        if split_path.is_dir():
            return read_audio_folder(split_path, settings, classes=split_classes)
        columns = {"path_column": path_column, "label_column": label_column}
        return read_audio_list(split_path, settings, **columns, classes=split_classes)

    train = read(splits["train"], classes)
    return {
        split: train if split == "train" else read(split_path, train.class_names)
        for split, split_path in splits.items()
    }
