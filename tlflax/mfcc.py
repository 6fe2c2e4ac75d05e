"""Mel-frequency cepstral coefficients in numpy: the classical audio features, without JAX.

The classical audio baseline describes a clip by the mean and standard deviation over time
of its first 20 MFCCs (:func:`mfcc_statistics`). These are ``librosa.feature.mfcc``'s with
its defaults (librosa 0.11), computed for a whole batch of clips at once::

    clip -> zero-padded by fft_size // 2 at each end, framed (2048 samples, hop 512)
         -> periodic Hann window -> |rfft|^2 -> 128 Slaney mel bands (area-normalised)
         -> 10 log10(max(mel, 1e-10)), floored at the clip's maximum - 80 dB
         -> orthonormal DCT-II over the mel bands, first n_mfcc coefficients

Clips that ``prepare`` zero-padded to one length can leave the padding out of their
statistics (``exclude_zero_padding``): the statistics of the clip as it was recorded.

librosa is only a test dependency, and :mod:`tlflax.audio` - whose log-mel front end runs
in JAX - loads JAX, which a scikit-learn baseline never needs: hence this module's own
numpy filterbank. It computes in float32 throughout; librosa windows and transforms in
float64, then keeps float32: they differ by float32 rounding (tests/test_audio_baseline.py).

Example:
    >>> clips = np.zeros((2, 48000), np.float32)  # two 3-second clips at 16 kHz
    >>> mfcc_statistics(clips, 16000).shape
    (2, 40)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import scipy.fft
from numpy.lib.stride_tricks import sliding_window_view

# librosa.feature.mfcc's defaults (those of melspectrogram and power_to_db).
FFT_SIZE = 2048
HOP_LENGTH = 512
MEL_BANDS = 128
TOP_DB = 80.0
AMPLITUDE_FLOOR = 1e-10  # power_to_db's amin: log10 of a silent band stays finite
# Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _LINEAR_HZ_PER_MEL
_LOG_STEP = np.log(6.4) / 27.0
# Clips framed and transformed at once: ~250 MB of working memory for 3 s clips.
_CLIPS_PER_CHUNK = 128


def _hz_to_mel(frequencies: np.ndarray) -> np.ndarray:
    linear = frequencies / _LINEAR_HZ_PER_MEL
    # np.maximum keeps log() finite where the linear branch is the one chosen.
    above = _LOG_START_MEL + np.log(np.maximum(frequencies, 1e-10) / _LOG_START_HZ) / _LOG_STEP
    return np.where(frequencies >= _LOG_START_HZ, above, linear)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    above = _LOG_START_HZ * np.exp(_LOG_STEP * (mels - _LOG_START_MEL))
    return np.where(mels >= _LOG_START_MEL, above, mels * _LINEAR_HZ_PER_MEL)


@functools.cache
def slaney_mel_filterbank(
    sample_rate: int,
    fft_size: int = FFT_SIZE,
    mel_bands: int = MEL_BANDS,
    min_frequency: float = 0.0,
    max_frequency: float | None = None,
) -> np.ndarray:
    """Mel filters as a read-only float32 matrix (fft_size // 2 + 1, mel_bands).

    ``power_spectrum @ slaney_mel_filterbank(...)`` gives the mel spectrum. Triangular
    filters equally spaced on Slaney's mel scale from ``min_frequency`` to ``max_frequency``
    (None: Nyquist), each scaled to unit area in Hz, as ``librosa.filters.mel(sr, n_fft,
    n_mels, fmin, fmax)`` with its defaults htk=False, norm="slaney". Built in float64 and
    rounded to float32 once, as librosa does; cached.
    """
    top_frequency = sample_rate / 2 if max_frequency is None else max_frequency
    frequencies = np.fft.rfftfreq(fft_size, d=1.0 / sample_rate)
    edge_mels = np.linspace(
        _hz_to_mel(np.array(min_frequency)), _hz_to_mel(np.array(top_frequency)), mel_bands + 2
    )
    edges = _mel_to_hz(edge_mels)  # (mel_bands + 2,): lower, centre, upper of each filter
    widths = np.diff(edges)
    distance = edges[:, np.newaxis] - frequencies[np.newaxis, :]
    rising = -distance[:-2] / widths[:-1, np.newaxis]
    falling = distance[2:] / widths[1:, np.newaxis]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, np.newaxis]
    filterbank = np.ascontiguousarray(weights.T, dtype=np.float32)
    filterbank.flags.writeable = False  # cached and shared: nobody may change it
    return filterbank


@functools.cache
def _dct_matrix(mel_bands: int, n_mfcc: int) -> np.ndarray:
    """(mel_bands, n_mfcc): ``bands @ matrix`` is the first n_mfcc of the orthonormal DCT-II."""
    basis = scipy.fft.dct(np.eye(mel_bands), type=2, norm="ortho", axis=0)[:n_mfcc]
    matrix = np.ascontiguousarray(basis.T, dtype=np.float32)
    matrix.flags.writeable = False
    return matrix


def _log_mel_db(clips: np.ndarray, sample_rate: int, frames_kept: np.ndarray) -> np.ndarray:
    """``power_to_db(melspectrogram(clip))`` of each clip, time-major (N, frames, mel_bands).

    The top_db floor of clip ``i`` follows its loudest band in its first ``frames_kept[i]``
    frames, as librosa's on those frames' samples alone.
    """
    half_frame = FFT_SIZE // 2
    padded = np.pad(clips, ((0, 0), (half_frame, half_frame)))  # center=True, zeros
    frames = sliding_window_view(padded, FFT_SIZE, axis=-1)[:, ::HOP_LENGTH]
    # Periodic Hann (scipy.signal.get_window("hann", FFT_SIZE)), as librosa's stft uses.
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(FFT_SIZE) / FFT_SIZE)
    spectrum = scipy.fft.rfft(frames * window.astype(np.float32), axis=-1)
    power = np.square(spectrum.real) + np.square(spectrum.imag)
    mel = power @ slaney_mel_filterbank(sample_rate)
    decibels = 10.0 * np.log10(np.maximum(mel, np.float32(AMPLITUDE_FLOOR)))
    # top_db: nothing more than 80 dB below the loudest band of the clip.
    kept = np.arange(decibels.shape[1]) < frames_kept[:, np.newaxis]
    loudest = decibels.max(axis=(1, 2), where=kept[..., np.newaxis], initial=-np.inf)
    return np.maximum(decibels, (loudest - np.float32(TOP_DB))[:, np.newaxis, np.newaxis])


def _without_zero_padding(clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each clip's span from its first to its last non-zero sample, moved to the start of
    its row (zeros after), and the span's length in samples (0 for a silent clip)."""
    nonzero = clips != 0
    sounding = nonzero.any(axis=1)
    first = np.where(sounding, nonzero.argmax(axis=1), 0)
    stop = np.where(sounding, clips.shape[1] - nonzero[:, ::-1].argmax(axis=1), 0)
    spans = np.zeros_like(clips)
    for row, (begin, end) in enumerate(zip(first, stop, strict=True)):
        spans[row, : end - begin] = clips[row, begin:end]
    return spans, stop - first


def _checked(clips: np.ndarray, n_mfcc: int) -> np.ndarray:
    clips = np.asarray(clips, dtype=np.float32)
    if clips.ndim != 2:
        raise ValueError(f"clips must have shape (N, samples), got {clips.shape}")
    if not 1 <= n_mfcc <= MEL_BANDS:
        raise ValueError(f"n_mfcc must be in 1..{MEL_BANDS}, got {n_mfcc}")
    return clips


def _chunks(
    clips: np.ndarray, sample_rate: int, n_mfcc: int, exclude_zero_padding: bool
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """(rows, MFCCs (rows, frames, n_mfcc), frames that count (rows,)) per chunk of clips."""
    for start in range(0, len(clips), _CLIPS_PER_CHUNK):
        chunk = clips[start : start + _CLIPS_PER_CHUNK]
        lengths = np.full(len(chunk), chunk.shape[1])
        if exclude_zero_padding:
            chunk, lengths = _without_zero_padding(chunk)
        frames_kept = 1 + lengths // HOP_LENGTH  # librosa's frame count (center=True)
        log_mel = _log_mel_db(chunk, sample_rate, frames_kept)
        yield (
            slice(start, start + len(chunk)),
            log_mel @ _dct_matrix(MEL_BANDS, n_mfcc),
            frames_kept,
        )


def mfcc(clips: np.ndarray, sample_rate: int, n_mfcc: int = 20) -> np.ndarray:
    """The MFCCs of each clip, time-major: float32 (N, frames, n_mfcc).

    ``librosa.feature.mfcc(y=clip, sr=sample_rate, n_mfcc=n_mfcc).T`` for every clip of
    ``clips`` (N, samples); ``frames = 1 + samples // 512``.

    Raises:
        ValueError: clips not of shape (N, samples), or n_mfcc not in 1..128.
    """
    clips = _checked(clips, n_mfcc)
    coefficients = np.empty((len(clips), 1 + clips.shape[1] // HOP_LENGTH, n_mfcc), np.float32)
    for rows, chunk_coefficients, _ in _chunks(clips, sample_rate, n_mfcc, False):
        coefficients[rows] = chunk_coefficients
    return coefficients


def mfcc_statistics(
    clips: np.ndarray, sample_rate: int, n_mfcc: int = 20, *, exclude_zero_padding: bool = False
) -> np.ndarray:
    """Each clip's MFCC means then standard deviations over time: float64 (N, 2 * n_mfcc).

    Columns ``[:n_mfcc]`` are the means of coefficients 0..n_mfcc-1 of :func:`mfcc`,
    ``[n_mfcc:]`` their (population) standard deviations.

    Args:
        clips: float (N, samples), at ``sample_rate`` Hz.
        sample_rate: in Hz.
        n_mfcc: coefficients per frame, 1..128.
        exclude_zero_padding: True: the statistics of each clip's span from its first to
            its last non-zero sample - librosa's MFCCs of that span alone - so that the
            zeros which bring clips to one length (``prepare`` pads short clips) do not
            count: on the Asterisk prompts, whose median is 1.3 s of a 3 s clip, the
            padding's silent frames cost the baseline 7 points of accuracy.

    Raises:
        ValueError: clips not of shape (N, samples), or n_mfcc not in 1..128.
    """
    clips = _checked(clips, n_mfcc)
    statistics = np.empty((len(clips), 2 * n_mfcc))
    for rows, coefficients, frames_kept in _chunks(
        clips, sample_rate, n_mfcc, exclude_zero_padding
    ):
        kept = np.arange(coefficients.shape[1]) < frames_kept[:, np.newaxis]
        kept, count = kept[..., np.newaxis], frames_kept[:, np.newaxis]
        mean = np.sum(coefficients, axis=1, where=kept, dtype=np.float64) / count
        deviations = np.square(coefficients - mean[:, np.newaxis])
        standard_deviation = np.sqrt(np.sum(deviations, axis=1, where=kept) / count)
        statistics[rows] = np.concatenate([mean, standard_deviation], axis=1)
    return statistics
