"""Sound files to fixed-length waveforms, on the host: decode, mix to mono, resample, crop or
pad. numpy, scipy and soundfile only - no JAX - so a server of an exported audio model
(:mod:`tlflax.serving`) brings a file to the stored dataset's form exactly as ``prepare``
did::

    file -> decode_audio -> mono -> resample -> fix_length -> float32 (samples,)

The log-mel front end that follows runs on the device, inside the model (:mod:`tlflax.audio`).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile
from scipy.signal import firwin, resample_poly

from tlflax.data.errors import DataError

# Containers libsndfile may report for the WAV, FLAC and AIFF suffixes (it detects the
# format from the content); anything else it can read (OGG, MP3, raw formats) is refused.
_SOUNDFILE_FORMATS = frozenset({"AIFF", "FLAC", "RF64", "W64", "WAV", "WAVEX"})

# The resampling filter: a Kaiser-windowed sinc (beta 12), 64 taps per polyphase branch
# each side, cut at 97% of the lower Nyquist frequency: flat to 90% of it (2e-5 dB), -3 dB
# at 96%, below -117 dB from 103%. scipy's default (10 taps, beta 5, cut at Nyquist) lets
# ~2e-5 of a clip's energy through just past the lower Nyquist, which log10(1 + 10000 x)
# turns into bands up to 2.6 away from librosa.load's (soxr "HQ"); this filter stays within
# 6e-4 of it below 3.5 kHz on the 8 kHz prompts, at ~5 ms per 3 s clip from 44.1 kHz.
_FILTER_TAPS_PER_PHASE = 64
_FILTER_CUTOFF = 0.97
_FILTER_KAISER_BETA = 12.0


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
    waveform: np.ndarray, clip_samples: int, align: Literal["start", "centre"] = "start"
) -> np.ndarray:
    """``waveform`` (samples,) cropped or zero-padded to ``clip_samples``.

    ``align="start"`` keeps the beginning and pads at the end; ``"centre"`` crops or pads
    both ends equally (the odd sample at the end).
    """
    excess = waveform.shape[0] - clip_samples
    if excess >= 0:
        start = 0 if align == "start" else excess // 2
        return waveform[start : start + clip_samples]
    before = 0 if align == "start" else -excess // 2
    return np.pad(waveform, (before, -excess - before))


def mono_clip(
    samples: np.ndarray,
    source_rate: int,
    sample_rate: int,
    clip_samples: int,
    align: Literal["start", "centre"] = "start",
) -> np.ndarray:
    """Decoded (frames, channels) samples as one float32 clip: the channels averaged, at
    ``sample_rate``, cropped or zero-padded to ``clip_samples`` (``align``)."""
    return fix_length(resample(samples.mean(axis=1), source_rate, sample_rate), clip_samples, align)
