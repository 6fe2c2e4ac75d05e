"""The log-mel front end and the audio reader on real recordings: Asterisk's voice prompts
(8 kHz mono WAV, five languages) that `make assets` unpacks into data/raw/asterisk/<language>/.

The front end must equal librosa (musicnn's reference), jitted or not; the reader must read
class folders, lists and splits in WAV, FLAC and AIFF, resample 8 -> 16 kHz keeping a real
700 Hz beep intact, and refuse each kind of bad input with a DataError naming the file.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import librosa
import numpy as np
import pytest
import soundfile

from tests.conftest import ROOT
from tlflax.audio import (
    MUSICNN_LOG_MEL,
    LogMelSettings,
    frame_count,
    log_mel_spectrogram,
    mel_filterbank,
    mel_spectrogram,
    patch_frames,
)
from tlflax.data.audio_folder import (
    FACT_COLUMNS,
    ClipSettings,
    fix_length,
    load_clip,
    read_audio_folder,
    read_audio_list,
    read_audio_splits,
    resample,
)
from tlflax.data.errors import DataError

RAW_ASTERISK = ROOT / "data" / "raw" / "asterisk"
# One short prompt per language, a long one (7.3 s, cropped at 3 s) and a real 700 Hz beep.
GOODBYES = [f"{language}/vm-goodbye.wav" for language in ("en", "es", "fr", "it", "ru")]
LONG_PROMPT = "en/vm-instructions.wav"
BEEP = "en/beep.wav"
SPEECH = [*GOODBYES, LONG_PROMPT]
BEEP_HZ = 700.0
# Measured against librosa 0.11 on 151 real clips (prompts, Hydrogen drums, noise): log-mel
# 7.6e-6 at most (values up to 6.6), mel power 4.2e-6 relative where above 1e-3 of the
# clip's maximum; magnitudes (power 1) keep float32 FFT noise of quiet bins: 9.1e-5, 2.4e-5.
POWER_TOLERANCES = {"log_mel": 2e-5, "mel_relative": 2e-5}
MAGNITUDE_TOLERANCES = {"log_mel": 2e-4, "mel_relative": 1e-4}
# jit and eager differ by XLA's operation fusion only (measured 4.8e-7).
JIT_TOLERANCE = 2e-6


@pytest.fixture(scope="module")
def asterisk() -> Path:
    """The voice prompts; their absence is a set-up failure, not a reason to skip."""
    missing = [name for name in (*SPEECH, BEEP, "ru/is.wav") if not (RAW_ASTERISK / name).is_file()]
    if missing:
        pytest.fail(f"{RAW_ASTERISK} lacks {missing}: run `make assets` to fetch the prompts")
    return RAW_ASTERISK


def _clip_16k(asterisk: Path, name: str) -> np.ndarray:
    samples, rate = soundfile.read(asterisk / name, dtype="float32")
    return resample(samples, rate, 16000)


def _librosa_mel(waveform: np.ndarray, settings: LogMelSettings) -> np.ndarray:
    """musicnn's reference: librosa's mel spectrogram, time-major."""
    return librosa.feature.melspectrogram(
        y=waveform,
        sr=settings.sample_rate,
        n_fft=settings.fft_size,
        hop_length=settings.hop_length,
        n_mels=settings.mel_bands,
        pad_mode=settings.pad_mode,
        power=settings.power,
    ).T


# --- the front end: log-mel on the device, resampling and length on the host -------------


def test_filterbank_equals_librosas_slaney_filters():
    reference = librosa.filters.mel(sr=16000, n_fft=512, n_mels=96)  # htk=False, norm="slaney"
    assert mel_filterbank().shape == (257, 96)
    np.testing.assert_allclose(mel_filterbank(), reference.T, rtol=0, atol=1e-8)
    assert not mel_filterbank().flags.writeable


@pytest.mark.parametrize(
    ("settings", "tolerances"),
    [
        (MUSICNN_LOG_MEL, POWER_TOLERANCES),
        (LogMelSettings(pad_mode="constant"), POWER_TOLERANCES),
        (LogMelSettings(power=1.0), MAGNITUDE_TOLERANCES),
    ],
    ids=["musicnn-reflect", "constant-padding", "magnitude"],
)
def test_log_mel_equals_librosa_on_real_clips(asterisk, settings, tolerances):
    for name in [*SPEECH, BEEP]:
        waveform = _clip_16k(asterisk, name)
        reference = _librosa_mel(waveform, settings)
        ours = np.asarray(mel_spectrogram(waveform[np.newaxis], settings))[0]
        assert ours.shape == reference.shape, name
        significant = reference > 1e-3 * reference.max()
        relative = np.abs(ours - reference)[significant] / reference[significant]
        assert relative.max() < tolerances["mel_relative"], name
        log_mel = np.asarray(log_mel_spectrogram(waveform[np.newaxis], settings))[0]
        np.testing.assert_allclose(
            log_mel, np.log10(1 + 10000 * reference), rtol=0, atol=tolerances["log_mel"]
        )


def test_jit_matches_eager_on_a_batch(asterisk):
    batch = np.stack([load_clip(asterisk / name, name, ClipSettings())[0] for name in SPEECH])
    eager = np.asarray(log_mel_spectrogram(batch))
    jitted = np.asarray(jax.jit(log_mel_spectrogram)(batch))
    assert eager.shape == jitted.shape == (6, 188, 96) and eager.dtype == np.float32
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=JIT_TOLERANCE)
    # A batch is its clips side by side: no clip leaks into another.
    single = np.asarray(log_mel_spectrogram(batch[2:3]))[0]
    np.testing.assert_allclose(eager[2], single, rtol=0, atol=JIT_TOLERANCE)


@pytest.mark.parametrize("num_samples", [257, 4000, 47616, 47999, 48000, 48255, 48256])
def test_frame_count_is_librosas(num_samples):
    waveform = np.random.default_rng(num_samples).uniform(-1, 1, num_samples).astype(np.float32)
    expected = _librosa_mel(waveform, MUSICNN_LOG_MEL).shape[0]
    assert frame_count(num_samples) == expected
    assert log_mel_spectrogram(waveform[np.newaxis]).shape == (1, expected, 96)


def test_musicnn_patch_is_187_frames_of_a_3_second_clip():
    # musicnn/extractor.py: n_frames = librosa.time_to_frames(3, sr, n_fft, hop) + 1
    expected = librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1
    assert patch_frames(3.0) == expected == 187
    assert frame_count(3 * 16000) == 188


def test_front_end_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="more than 256 samples"):
        log_mel_spectrogram(np.zeros((1, 256), np.float32))
    zero_padded = LogMelSettings(pad_mode="constant")  # any length: zeros need no samples
    assert log_mel_spectrogram(np.zeros((1, 100)), zero_padded).shape == (1, 1, 96)
    with pytest.raises(ValueError, match="pad_mode"):
        LogMelSettings(pad_mode="edge")
    with pytest.raises(ValueError, match="max_frequency"):
        LogMelSettings(max_frequency=9000.0)


def test_runtime_modules_do_not_import_librosa():
    code = "import sys, tlflax.audio, tlflax.data.audio_folder; assert 'librosa' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_resampling_8_to_16_khz_doubles_the_length_and_keeps_a_real_beep(asterisk):
    samples, rate = soundfile.read(asterisk / BEEP, dtype="float32")
    upsampled = resample(samples, rate, 16000)
    assert rate == 8000 and upsampled.shape == (2 * samples.shape[0],)
    spectrum = np.abs(np.fft.rfft(upsampled))
    frequencies = np.fft.rfftfreq(upsampled.shape[0], d=1 / 16000)
    assert abs(frequencies[spectrum.argmax()] - BEEP_HZ) < 16000 / upsampled.shape[0]
    # Same loudness, and no image of the beep above the source's 4 kHz Nyquist limit.
    rms = np.sqrt(np.mean(samples.astype(np.float64) ** 2))
    assert np.sqrt(np.mean(upsampled.astype(np.float64) ** 2)) == pytest.approx(rms, rel=0.01)
    assert (spectrum[frequencies > 4000] ** 2).sum() < 1e-8 * (spectrum**2).sum()


def test_resampling_matches_librosa_load_below_the_source_band_edge(asterisk):
    """Up to 3.5 kHz the log-mel of our resampling is librosa.load's (soxr "HQ"): <= 3e-4."""
    below_3500_hz = librosa.mel_frequencies(96 + 2, fmax=8000)[1:-1] < 3500
    for name in [*SPEECH, BEEP]:
        samples, rate = soundfile.read(asterisk / name, dtype="float32")
        soxr = librosa.resample(samples, orig_sr=rate, target_sr=16000)
        ours_and_soxr = log_mel_spectrogram(np.stack([resample(samples, rate, 16000), soxr]))
        assert np.abs(ours_and_soxr[0] - ours_and_soxr[1])[:, below_3500_hz].max() < 1e-3, name


def test_resampling_reproduces_a_known_tone():
    source = np.sin(2 * np.pi * 1000 * np.arange(8000) / 8000)  # 1 kHz, 1 s at 8 kHz
    expected = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    upsampled = resample(source.astype(np.float32), 8000, 16000)
    # Away from the ends, where the filter (128 taps each side at 16 kHz) sees zeros.
    np.testing.assert_allclose(upsampled[200:-200], expected[200:-200], atol=1e-5)


def test_fix_length_crops_and_pads_by_alignment():
    waveform = np.arange(1, 11, dtype=np.float32)
    np.testing.assert_array_equal(fix_length(waveform, 4), [1, 2, 3, 4])
    np.testing.assert_array_equal(fix_length(waveform, 4, "centre"), [4, 5, 6, 7])
    np.testing.assert_array_equal(fix_length(waveform[:3], 6), [1, 2, 3, 0, 0, 0])
    np.testing.assert_array_equal(fix_length(waveform[:3], 6, "centre"), [0, 1, 2, 3, 0, 0])
    # Looped, more than once where the clip is that short; a long clip is cropped as before.
    np.testing.assert_array_equal(
        fix_length(waveform[:3], 8, padding="repeat"), [1, 2, 3] * 2 + [1, 2]
    )
    np.testing.assert_array_equal(
        fix_length(waveform[:3], 6, "centre", "repeat"), [3, 1, 2, 3, 1, 2]
    )
    np.testing.assert_array_equal(fix_length(waveform, 4, padding="repeat"), [1, 2, 3, 4])


def test_load_clip_crops_a_long_prompt_and_pads_a_short_one(asterisk):
    long_clip, long_facts = load_clip(asterisk / LONG_PROMPT, LONG_PROMPT, ClipSettings())
    full = _clip_16k(asterisk, LONG_PROMPT)
    np.testing.assert_array_equal(long_clip, full[:48000])
    assert long_facts["cropped_fraction"] == pytest.approx(1 - 48000 / full.shape[0])
    assert long_facts["padding_fraction"] == 0
    short_clip, short_facts = load_clip(asterisk / GOODBYES[0], GOODBYES[0], ClipSettings())
    short = _clip_16k(asterisk, GOODBYES[0])
    np.testing.assert_array_equal(short_clip[: short.shape[0]], short)
    assert not short_clip[short.shape[0] :].any()
    assert short_facts["padding_fraction"] == pytest.approx(1 - short.shape[0] / 48000)
    assert short_facts["source_seconds"] == pytest.approx(0.865)
    assert short_facts["source_sample_rate"] == 8000
    looped_clip, looped_facts = load_clip(
        asterisk / GOODBYES[0], GOODBYES[0], ClipSettings(padding="repeat")
    )
    copies = -(-48000 // short.shape[0])  # 0.865 s in 3 s: three whole copies and a part
    np.testing.assert_array_equal(looped_clip, np.tile(short, copies)[:48000])
    assert looped_facts == short_facts  # the facts describe the recording, however padded


# --- reading class folders, lists and splits ---------------------------------------------


def _copy(asterisk: Path, name: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((asterisk / name).read_bytes())
    return target


def _language_folders(asterisk: Path, root: Path) -> Path:
    """root/<language>/: goodbye and digit one (in digits/) of en, fr and ru."""
    for language in ("ru", "en", "fr"):
        _copy(asterisk, f"{language}/vm-goodbye.wav", root / language / "vm-goodbye.wav")
        _copy(asterisk, f"{language}/digits/1.wav", root / language / "digits" / "1.wav")
    return root


def test_read_audio_folder_reads_class_folders_in_sorted_order(asterisk, tmp_path):
    root = _language_folders(asterisk, tmp_path / "voices")
    dataset = read_audio_folder(root)
    assert dataset.class_names == ["en", "fr", "ru"]
    assert dataset.waveforms.shape == (6, 48000) and dataset.waveforms.dtype == np.float32
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 1, 2, 2])
    assert list(dataset.facts.columns) == list(FACT_COLUMNS)
    assert dataset.facts["path"].iloc[1:3].tolist() == ["en/vm-goodbye.wav", "fr/digits/1.wav"]
    expected, _ = load_clip(asterisk / "fr/vm-goodbye.wav", "fr", ClipSettings())
    np.testing.assert_array_equal(dataset.waveforms[3], expected)
    facts = dataset.facts
    assert (facts["source_sample_rate"] == 8000).all() and (facts["source_channels"] == 1).all()
    assert not facts["is_silent"].any() and (facts["clipped_fraction"] == 0).all()
    assert (facts["peak_amplitude"] > 0.1).all() and (facts["rms_amplitude"] > 0.01).all()
    np.testing.assert_array_equal(read_audio_folder(root).waveforms, dataset.waveforms)


def test_flac_aiff_and_stereo_decode_to_the_same_clip(asterisk, tmp_path):
    samples, rate = soundfile.read(asterisk / GOODBYES[0], dtype="int16")
    for folder in ("lossless", "stereo"):
        (tmp_path / folder).mkdir()
    for suffix, container in [("flac", "FLAC"), ("aiff", "AIFF"), ("aif", "AIFF")]:
        path = tmp_path / "lossless" / f"goodbye.{suffix}"
        soundfile.write(path, samples, rate, "PCM_16", format=container)
    # Both channels of the stereo file hold the prompt: their average is the prompt itself.
    soundfile.write(tmp_path / "stereo" / "goodbye.wav", np.stack([samples] * 2, 1), rate)
    dataset = read_audio_folder(tmp_path)
    reference, _ = load_clip(asterisk / GOODBYES[0], GOODBYES[0], ClipSettings())
    for waveform in dataset.waveforms:
        np.testing.assert_array_equal(waveform, reference)
    assert dataset.facts["source_channels"].tolist() == [1, 1, 1, 2]


def test_facts_flag_silence_and_clipping(asterisk, tmp_path):
    samples, rate = soundfile.read(asterisk / GOODBYES[0], dtype="float32")
    for folder in ("loud", "quiet"):
        (tmp_path / folder).mkdir()
    soundfile.write(tmp_path / "loud" / "clipped.wav", np.clip(samples * 8, -1, 1), rate)
    soundfile.write(tmp_path / "quiet" / "silence.wav", np.zeros(4000, np.float32), rate)
    facts = read_audio_folder(tmp_path).facts.set_index("path")
    assert facts.loc["loud/clipped.wav", "clipped_fraction"] > 0.01
    assert facts.loc["quiet/silence.wav", ["is_silent", "peak_amplitude"]].tolist() == [True, 0]


def test_read_audio_list_keeps_row_order_and_paths(asterisk, tmp_path):
    root = _language_folders(asterisk, tmp_path / "voices")
    rows = ["ru/vm-goodbye.wav,ru", "en/digits/1.wav,en", "fr/vm-goodbye.wav,fr"]
    (root / "clips.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    dataset = read_audio_list(root / "clips.csv", ClipSettings(clip_seconds=1.0))
    assert dataset.class_names == ["en", "fr", "ru"]
    np.testing.assert_array_equal(dataset.labels, [2, 0, 1])
    assert dataset.waveforms.shape == (3, 16000)
    assert dataset.facts["path"].tolist() == [row.split(",")[0] for row in rows]
    records = [dict(zip(("file", "language"), row.split(","), strict=True)) for row in rows]
    (root / "clips.jsonl").write_text("\n".join(json.dumps(record) for record in records))
    columns = {"path_column": "file", "label_column": "language"}
    listed = read_audio_list(root / "clips.jsonl", ClipSettings(clip_seconds=1.0), **columns)
    np.testing.assert_array_equal(listed.waveforms, dataset.waveforms)


def test_read_audio_splits_uses_train_classes(asterisk, tmp_path):
    _language_folders(asterisk, tmp_path / "train")
    _copy(asterisk, "ru/digits/1.wav", tmp_path / "test" / "ru" / "one.wav")
    splits = read_audio_splits(tmp_path)
    assert splits["test"].class_names == ["en", "fr", "ru"]
    np.testing.assert_array_equal(splits["test"].labels, [2])
    _copy(asterisk, "it/digits/1.wav", tmp_path / "test" / "it" / "one.wav")
    with pytest.raises(DataError, match=r"test/it: unknown class 'it'"):
        read_audio_splits(tmp_path)


# --- bad input: one DataError naming the file --------------------------------------------


def _two_classes(asterisk: Path, root: Path) -> Path:
    _copy(asterisk, GOODBYES[0], root / "en" / "good.wav")
    _copy(asterisk, GOODBYES[2], root / "fr" / "good.wav")
    return root


@pytest.mark.parametrize(
    ("name", "make", "problem"),
    [
        ("empty.wav", lambda path, _: path.write_bytes(b""), "audio file is empty"),
        (
            "no-samples.wav",
            lambda path, clips: _copy(clips, "ru/is.wav", path),
            "audio file holds no samples",
        ),
        ("text.wav", lambda path, _: path.write_text("not audio"), "not a readable WAV"),
        (
            "truncated.wav",
            lambda path, clips: path.write_bytes((clips / BEEP).read_bytes()[:30]),
            "not a readable WAV",
        ),
        ("notes.txt", lambda path, _: path.write_text("hello"), "not an audio file"),
        (
            "vorbis.wav",
            lambda path, _: soundfile.write(path, np.zeros(800), 8000, format="OGG"),
            "holds OGG audio",
        ),
        (
            "nan.wav",
            lambda path, _: soundfile.write(path, np.full(800, np.nan), 8000, "FLOAT"),
            "audio file holds NaN or infinite",
        ),
    ],
)
def test_bad_file_in_a_class_folder_is_named(asterisk, tmp_path, name, make, problem):
    root = _two_classes(asterisk, tmp_path / "voices")
    make(root / "fr" / name, asterisk)
    with pytest.raises(DataError, match=_names(root / "fr" / name, problem)) as error:
        read_audio_folder(root)
    assert "\n" not in str(error.value)


def _names(location: Path | str, problem: str) -> str:
    """A pattern for a DataError message: the location first, then the problem."""
    return f"^{re.escape(str(location))}: {problem}"


def test_bad_folders_are_named(asterisk, tmp_path):
    with pytest.raises(DataError, match=_names(tmp_path / "missing", "dataset folder not found")):
        read_audio_folder(tmp_path / "missing")
    root = _two_classes(asterisk, tmp_path / "voices")
    (root / "it").mkdir()
    with pytest.raises(DataError, match=_names(root / "it", "class folder holds no audio")):
        read_audio_folder(root)
    (root / "it").rmdir()
    (root / "stray.wav").write_bytes((asterisk / BEEP).read_bytes())
    with pytest.raises(DataError, match=_names(root / "stray.wav", "is not a class folder")):
        read_audio_folder(root)
    (root / "stray.wav").unlink()
    (root / "fr" / "outside.wav").symlink_to(asterisk / BEEP)
    with pytest.raises(DataError, match=_names(root / "fr" / "outside.wav", "resolves to")):
        read_audio_folder(root)
    _copy(asterisk, BEEP, tmp_path / "one-class" / "en" / "beep.wav")
    with pytest.raises(DataError, match=_names(tmp_path / "one-class", "needs at least 2")):
        read_audio_folder(tmp_path / "one-class")


def test_bad_list_rows_are_named_with_their_line(asterisk, tmp_path):
    root = _two_classes(asterisk, tmp_path / "voices")
    _copy(asterisk, BEEP, tmp_path / "outside.wav")
    (root / "fr" / "notes.txt").write_text("hello")
    (root / "fr" / "empty.wav").write_bytes(b"")
    clips = root / "clips.csv"
    for row, problem in [
        ("fr/gone.wav,fr", "fr/gone.wav: audio file not found"),
        ("fr,fr", "fr: is not a file"),
        (",fr", "empty path"),
        ("fr/good.wav,", "missing label"),
        ("../outside.wav,fr", "../outside.wav: resolves to .* outside the dataset root"),
        ("fr/notes.txt,fr", "fr/notes.txt: not an audio file"),
        ("fr/empty.wav,fr", "fr/empty.wav: audio file is empty"),
    ]:
        clips.write_text(f"path,label\nen/good.wav,en\n{row}\n")
        with pytest.raises(DataError, match=_names(f"{clips}, line 3", problem)):
            read_audio_list(clips)
    clips.write_text("file,label\nen/good.wav,en\n")
    with pytest.raises(DataError, match="has no column 'path'"):
        read_audio_list(clips)
    with pytest.raises(DataError, match="file not found"):
        read_audio_list(root / "missing.csv")
