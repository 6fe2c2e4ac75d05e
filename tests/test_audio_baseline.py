"""The classical audio baseline on real recordings: Asterisk's voice prompts (8 kHz mono WAV,
five languages) that `make assets` unpacks into data/raw/asterisk/<language>/.

Its features - mean and standard deviation over time of 20 MFCCs - must equal librosa's
(the reference the issue's outside figure was measured with) without the library importing
librosa or JAX; and the baseline, through the stage's own reader, must identify the
language of held-out prompts from 20 training clips per language.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile

from tests.conftest import RAW_ASTERISK, ROOT
from tlflax.baseline import CANDIDATES, fit_baseline
from tlflax.baseline_predictions import fit_and_predict
from tlflax.config import BaselineParams
from tlflax.data.audio_folder import fix_length, resample
from tlflax.data.errors import DataError
from tlflax.data.tfds_audio import write_audio_dataset
from tlflax.mfcc import mfcc, mfcc_statistics, slaney_mel_filterbank

LANGUAGES = ("en", "es", "fr", "it", "ru")
# One short prompt per language, a long one (7.3 s: cropped at 3 s) and a 700 Hz beep.
CLIPS = [
    *(f"{language}/vm-goodbye.wav" for language in LANGUAGES),
    "en/vm-instructions.wav",
    "en/beep.wav",
]
RATE = 16000
CLIP_SAMPLES = 3 * RATE
# Measured against librosa 0.11 on all 2,831 prompts at 16 kHz (coefficients up to ~1100 in
# magnitude, so float32 rounding of the dB values shows): coefficients 1.2e-3 at most (c0;
# the others 3.1e-4), 2.7e-5 of their column's largest magnitude; means and standard
# deviations 5.6e-4; statistics without the zero padding (start- and centre-aligned 3 s
# clips) against librosa's of the unpadded clip, 5.1e-4.
COEFFICIENT_TOLERANCE = 2e-3
STATISTICS_TOLERANCE = 1e-3
# The split of the baseline's test: per language, drawn at random from all the prompts.
TRAIN_PER_LANGUAGE, VALIDATION_PER_LANGUAGE, TEST_PER_LANGUAGE = 20, 10, 50


@pytest.fixture(scope="module")
def asterisk() -> Path:
    """The voice prompts; their absence is a set-up failure, not a reason to skip."""
    missing = [name for name in CLIPS if not (RAW_ASTERISK / name).is_file()]
    if missing:
        pytest.fail(f"{RAW_ASTERISK} lacks {missing}: run `make assets` to fetch the prompts")
    return RAW_ASTERISK


def _clip_16k(path: Path) -> np.ndarray:
    samples, rate = soundfile.read(path, dtype="float32")
    return resample(samples, rate, RATE)


def _librosa_statistics(waveform: np.ndarray) -> np.ndarray:
    coefficients = librosa.feature.mfcc(y=waveform, sr=RATE, n_mfcc=20)
    return np.concatenate([coefficients.mean(axis=1), coefficients.std(axis=1)])


# --- the features: librosa's MFCCs, in numpy --------------------------------------------


@pytest.mark.parametrize(
    ("sample_rate", "fft_size", "mel_bands", "min_frequency", "max_frequency"),
    [(16000, 2048, 128, 0.0, None), (22050, 2048, 128, 0.0, None), (16000, 512, 96, 300.0, 3000.0)],
)
def test_filterbank_equals_librosas_slaney_filters(
    sample_rate, fft_size, mel_bands, min_frequency, max_frequency
):
    ours = slaney_mel_filterbank(sample_rate, fft_size, mel_bands, min_frequency, max_frequency)
    reference = librosa.filters.mel(  # htk=False, norm="slaney"
        sr=sample_rate, n_fft=fft_size, n_mels=mel_bands, fmin=min_frequency, fmax=max_frequency
    )
    np.testing.assert_allclose(ours, reference.T, rtol=0, atol=1e-8)
    assert not ours.flags.writeable


def test_mfccs_and_their_statistics_equal_librosas_on_real_clips(asterisk):
    for name in CLIPS:
        waveform = _clip_16k(asterisk / name)
        reference = librosa.feature.mfcc(y=waveform, sr=RATE, n_mfcc=20).T
        ours = mfcc(waveform[np.newaxis], RATE)[0]
        assert ours.shape == reference.shape == (1 + len(waveform) // 512, 20), name
        np.testing.assert_allclose(ours, reference, rtol=0, atol=COEFFICIENT_TOLERANCE)
        statistics = mfcc_statistics(waveform[np.newaxis], RATE)[0]
        np.testing.assert_allclose(
            statistics, _librosa_statistics(waveform), rtol=0, atol=STATISTICS_TOLERANCE
        )


def test_statistics_leave_the_zero_padding_out_as_librosa_on_the_unpadded_clip(asterisk):
    waveforms = [_clip_16k(asterisk / name) for name in CLIPS]
    for align in ("start", "centre"):
        clips = np.stack([fix_length(waveform, CLIP_SAMPLES, align) for waveform in waveforms])
        statistics = mfcc_statistics(clips, RATE, exclude_zero_padding=True)
        for name, waveform, clip, row in zip(CLIPS, waveforms, clips, statistics, strict=True):
            unpadded = waveform if len(waveform) <= CLIP_SAMPLES else clip  # long: cropped
            reference = _librosa_statistics(unpadded)
            np.testing.assert_allclose(
                row, reference, rtol=0, atol=STATISTICS_TOLERANCE, err_msg=name
            )
    # Counted, the padding is what librosa sees in the padded clip: other numbers.
    padded = mfcc_statistics(clips[:1], RATE)[0]
    np.testing.assert_allclose(
        padded, _librosa_statistics(clips[0]), rtol=0, atol=STATISTICS_TOLERANCE
    )
    assert np.abs(padded - statistics[0]).max() > 1.0


def test_mfccs_of_silence_are_finite_and_bad_shapes_are_refused():
    silent = np.zeros((2, 8000), np.float32)
    for exclude in (False, True):
        statistics = mfcc_statistics(silent, RATE, exclude_zero_padding=exclude)
        assert statistics.shape == (2, 40) and np.isfinite(statistics).all()
        assert statistics[:, 20:].max() < 1e-3  # nothing varies but float32 rounding
    with pytest.raises(ValueError, match=r"shape \(N, samples\)"):
        mfcc_statistics(np.zeros(8000, np.float32), RATE)
    with pytest.raises(ValueError, match="n_mfcc must be in 1..128"):
        mfcc(silent, RATE, n_mfcc=129)


# --- the baseline: MFCC statistics + a scikit-learn classifier ---------------------------


def _draw_prompts(asterisk: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train, validation and test clips of every language, as ``prepare`` stores them: 16 kHz,
    3 s (cropped or zero-padded at the end)."""
    per_split = {
        "train": TRAIN_PER_LANGUAGE,
        "validation": VALIDATION_PER_LANGUAGE,
        "test": TEST_PER_LANGUAGE,
    }
    rng = np.random.default_rng(0)
    splits: dict[str, tuple[list, list]] = {split: ([], []) for split in per_split}
    for label, language in enumerate(LANGUAGES):
        paths = sorted((asterisk / language).rglob("*.wav"))
        drawn = iter(rng.permutation(len(paths)))
        for split, count in per_split.items():
            for index in [next(drawn) for _ in range(count)]:
                splits[split][0].append(fix_length(_clip_16k(paths[index]), CLIP_SAMPLES))
                splits[split][1].append(label)
    return {split: (np.stack(clips), np.array(labels)) for split, (clips, labels) in splits.items()}


def test_the_baseline_identifies_the_language_of_held_out_prompts(asterisk, tmp_path):
    splits = _draw_prompts(asterisk)
    write_audio_dataset(tmp_path, "prompts", splits, list(LANGUAGES), RATE)

    predictions = fit_and_predict(tmp_path, "prompts", "audio", BaselineParams(seed=0))

    baseline = predictions.baseline
    names = [candidate.name for candidate in CANDIDATES["audio"]]
    assert list(baseline.candidate_cv_accuracies) == names and baseline.model in names
    assert baseline.train_examples == 5 * TRAIN_PER_LANGUAGE
    probabilities = predictions.probabilities["test"]
    assert probabilities.shape == (5 * TEST_PER_LANGUAGE, 5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    accuracy = (probabilities.argmax(axis=1) == splits["test"][1]).mean()
    # Chance is 0.2. Measured: 0.928 on these 250 prompts (mfcc_stats_rbf_svm(C=1), CV 0.900);
    # 0.887-0.911 over five draws of 20 per language tested on all other 2,731 prompts.
    assert accuracy > 0.8, (baseline.model, accuracy)


def test_an_audio_baseline_needs_float_clips_and_their_rate():
    clips = np.random.default_rng(0).uniform(-0.5, 0.5, (6, 4000)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="sample_rate"):
        fit_baseline(clips, labels, modality="audio", seed=0)
    with pytest.raises(DataError, match=r"^train: clips must be float arrays of shape"):
        fit_baseline(
            (clips * 32767).astype(np.int16), labels, modality="audio", seed=0, sample_rate=RATE
        )


def test_a_split_at_another_sample_rate_is_refused(monkeypatch, tmp_path):
    clips = np.random.default_rng(0).uniform(-0.5, 0.5, (6, 4000)).astype(np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    rates = {"train": RATE, "validation": RATE, "test": 8000}
    monkeypatch.setattr(
        "tlflax.baseline_predictions.read_audio_split",
        lambda data_dir, name, split: (clips, labels, rates[split]),
    )
    monkeypatch.setattr(
        "tlflax.baseline_predictions.read_class_names", lambda data_dir, name: ["a", "b"]
    )
    with pytest.raises(DataError, match="split 'test' holds clips at 8000 Hz, train at 16000"):
        fit_and_predict(tmp_path, "prompts", "audio", BaselineParams())


def test_the_baseline_path_imports_neither_librosa_nor_jax():
    code = (
        "import sys, tlflax.mfcc, tlflax.baseline, tlflax.baseline_predictions, "
        "pipelines.stages.baseline\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'librosa', 'jax'})\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
