"""Waveforms to log-mel spectrograms: the audio front end.

Audio models see a log-mel spectrogram, not raw samples. Computing it in JAX, like image
resizing, keeps the stored dataset a plain waveform array and lets the front end run
jit-compiled on the accelerator with the rest of the model; on the host beforehand, every
clip is brought to one rate and one length (:mod:`tlflax.data.audio_folder`)::

    file -> resample -> fix_length -> waveforms (N, samples) float32      (host, numpy)
         -> log_mel_spectrogram -> (N, frames, mel_bands)                (device, JAX)

The defaults are musicnn's (``musicnn==0.1.0``, ``musicnn/extractor.py``), whose
pretrained weights expect exactly this input: ``librosa.feature.melspectrogram`` at
16 kHz with ``n_fft=512, hop_length=256, n_mels=96`` and librosa's other defaults of the
time (0.7: ``power=2``, periodic Hann window, ``center=True`` with ``pad_mode="reflect"``,
Slaney mel scale and area norm), then ``log10(1 + 10000 * mel)``. librosa 0.10 changed the
default padding to ``"constant"`` (zeros); :class:`LogMelSettings` offers both.

musicnn's extractor also rounds the mel power to float16 before the log; this front end
stays in float32 (the rounding moves the log-mel values by at most ~2e-4, far below what
the model can tell apart). Its patches are :func:`patch_frames` long (187 for 3 s),
taken from the start of the clip's :func:`frame_count` frames (188 for 3 s).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from tlflax.mfcc import slaney_mel_filterbank


@dataclass(frozen=True)
class LogMelSettings:
    """How waveforms become log-mel spectrograms; the defaults are musicnn's.

    Attributes:
        sample_rate: of the waveforms, in Hz.
        fft_size: samples per frame (and FFT length; the window spans the whole frame).
        hop_length: samples between the starts of consecutive frames.
        mel_bands: number of mel filters.
        min_frequency, max_frequency: the mel filters' range in Hz; None = Nyquist.
        power: 2 for a power spectrogram (musicnn), 1 for magnitudes.
        pad_mode: how the signal is extended by ``fft_size // 2`` at each end so frame
            ``t`` is centred on sample ``t * hop_length``: ``"reflect"`` (librosa < 0.10,
            musicnn) or ``"constant"`` (zeros; librosa >= 0.10).
        log_scale: the ``c`` of ``log10(1 + c * mel)``.
    """

    sample_rate: int = 16000
    fft_size: int = 512
    hop_length: int = 256
    mel_bands: int = 96
    min_frequency: float = 0.0
    max_frequency: float | None = None
    power: float = 2.0
    pad_mode: Literal["reflect", "constant"] = "reflect"
    log_scale: float = 10000.0

    def __post_init__(self) -> None:
        if self.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {self.pad_mode!r}")
        if not 0 < self.hop_length <= self.fft_size:
            raise ValueError(
                f"hop_length must be in 1..fft_size ({self.fft_size}), got {self.hop_length}"
            )
        if not 0 <= self.min_frequency < self.top_frequency <= self.sample_rate / 2:
            raise ValueError(
                f"need 0 <= min_frequency < max_frequency <= {self.sample_rate / 2} Hz, got "
                f"{self.min_frequency} and {self.top_frequency}"
            )

    @property
    def top_frequency(self) -> float:
        """The mel filters' upper edge in Hz: ``max_frequency``, or Nyquist when None."""
        return self.sample_rate / 2 if self.max_frequency is None else self.max_frequency


MUSICNN_LOG_MEL = LogMelSettings()


@functools.cache
def mel_filterbank(settings: LogMelSettings = MUSICNN_LOG_MEL) -> np.ndarray:
    """The mel filters as a read-only float32 matrix (fft_size // 2 + 1, mel_bands).

    ``power_spectrum @ mel_filterbank(settings)`` gives the mel spectrum. Triangular
    filters equally spaced on Slaney's mel scale, each scaled to unit area in Hz
    (``2 / bandwidth``), as ``librosa.filters.mel(..., htk=False, norm="slaney")``. Built
    in float64 and rounded to float32 once, as librosa does; cached per settings.
    """
    return slaney_mel_filterbank(
        settings.sample_rate,
        settings.fft_size,
        settings.mel_bands,
        settings.min_frequency,
        settings.top_frequency,
    )


def _hann_window(size: int) -> np.ndarray:
    """The periodic Hann window (``scipy.signal.get_window("hann", size)``), as librosa uses."""
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(size) / size)).astype(np.float32)


def frame_count(num_samples: int, settings: LogMelSettings = MUSICNN_LOG_MEL) -> int:
    """Frames :func:`log_mel_spectrogram` gives for ``num_samples`` samples (3 s: 188)."""
    return 1 + num_samples // settings.hop_length


def patch_frames(seconds: float, settings: LogMelSettings = MUSICNN_LOG_MEL) -> int:
    """musicnn's input length in frames for ``seconds`` of audio (3 s: 187).

    musicnn computes it as ``librosa.time_to_frames(seconds, sr, n_fft, hop) + 1``: the
    frames whose window, uncentred, fits inside ``seconds`` — one fewer than
    :func:`frame_count` of a clip that long. Its models take the first ``patch_frames``
    frames of a clip's spectrogram.
    """
    samples = int(seconds * settings.sample_rate)
    return (samples - settings.fft_size // 2) // settings.hop_length + 1


def mel_spectrogram(
    waveforms: jax.Array | np.ndarray, settings: LogMelSettings = MUSICNN_LOG_MEL
) -> jax.Array:
    """Mel power spectrogram (..., frames, mel_bands) of waveforms (..., samples), float32.

    The same as ``librosa.feature.melspectrogram(y=waveform, sr, n_fft, hop_length,
    n_mels, pad_mode, power)``, transposed to time-major. Jit-compilable; shapes are
    static, so each clip length compiles once.

    Raises:
        ValueError: with ``pad_mode="reflect"``, for clips of ``fft_size // 2`` samples or
            fewer (too short to mirror).
    """
    waveforms = jnp.asarray(waveforms, dtype=jnp.float32)
    num_samples = waveforms.shape[-1]
    half_frame = settings.fft_size // 2
    if settings.pad_mode == "reflect" and num_samples <= half_frame:
        raise ValueError(
            f"reflect padding needs clips of more than {half_frame} samples, got {num_samples}"
        )
    # Centre frame t on sample t * hop_length, as librosa's center=True does.
    padding = [(0, 0)] * (waveforms.ndim - 1) + [(half_frame, half_frame)]
    padded = jnp.pad(waveforms, padding, mode=settings.pad_mode)
    # A constant (frames, fft_size) index table: one gather cuts all frames at once.
    starts = np.arange(frame_count(num_samples, settings)) * settings.hop_length
    frame_indices = starts[:, np.newaxis] + np.arange(settings.fft_size)[np.newaxis, :]
    frames = padded[..., frame_indices] * _hann_window(settings.fft_size)
    spectrum = jnp.fft.rfft(frames, axis=-1)
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    if settings.power != 2.0:
        power = power ** (settings.power / 2.0)
    # HIGHEST: GPUs (TF32) and TPUs (bfloat16) otherwise round float32 matmul inputs,
    # an error of ~1e-3 that no model needs; this matmul is tiny either way.
    return jnp.matmul(power, mel_filterbank(settings), precision=jax.lax.Precision.HIGHEST)


def log_mel_spectrogram(
    waveforms: jax.Array | np.ndarray, settings: LogMelSettings = MUSICNN_LOG_MEL
) -> jax.Array:
    """Log-compressed mel spectrogram (N, frames, mel_bands) of waveforms (N, samples).

    ``log10(1 + log_scale * mel)`` of :func:`mel_spectrogram`: musicnn's input with the
    default settings. Frames: :func:`frame_count` of the clip length. Jit-compilable.

    Example:
        >>> clips = np.zeros((2, 48000), np.float32)  # two 3-second clips at 16 kHz
        >>> log_mel_spectrogram(clips).shape
        (2, 188, 96)
    """
    mel = mel_spectrogram(waveforms, settings)
    return jnp.log10(1.0 + settings.log_scale * mel)
