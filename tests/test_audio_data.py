"""Audio sources through `prepare`: the spoken-language prompts and a user's audio folder.

Real recordings only: Asterisk's voice prompts (data/raw/asterisk, 8 kHz WAV) and Hydrogen's
drum hits (data/raw/hydrogen-drumkits, 22-44 kHz WAV and FLAC), both unpacked by
`make assets`. Each good source is prepared into a TFDS dataset, read back (splits, rate,
clip length, class names) and its manifest validated by Great Expectations; bad files and
keys stop with one line naming them and nothing written; silent and clipped clips fail the
gate by name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile

from tests.conftest import RAW_ASTERISK, ROOT
from tlflax.config import ParamsError, PrepareParams, parse_params
from tlflax.data.audio_folder import FACT_COLUMNS
from tlflax.data.errors import DataError
from tlflax.data.manifest import AUDIO_FACT_COLUMNS, AUDIO_MANIFEST_SCHEMA, audio_content_hash
from tlflax.data.sources import PreparedDataset, prepare_dataset
from tlflax.data.spoken_language import SPOKEN_LANGUAGE_CLASSES, spoken_language_files
from tlflax.data.tfds_audio import read_audio_split
from tlflax.data.tfds_store import read_class_names
from tlflax.validation import ValidationSummary, ValidationThresholds, validate_manifest

RAW_DRUMS = ROOT / "data" / "raw" / "hydrogen-drumkits"
# Seven prompts of each language at the top of its folder, and one from a sub-folder.
PROMPTS = (
    "agent-alreadyon",
    "agent-incorrect",
    "agent-loggedoff",
    "agent-loginok",
    "agent-pass",
    "auth-incorrect",
    "auth-thankyou",
)
SUB_FOLDER_PROMPT = "digits/1.wav"
# Speech in four languages, and drum hits: mono and stereo, 22.05 and 44.1 kHz, one FLAC.
SPEECH = [
    f"{language}/{prompt}.wav" for language in ("en", "fr", "it", "ru") for prompt in PROMPTS[:2]
]
DRUMS = [
    *(
        f"Audiophob/{name}.wav"
        for name in (
            "101450__menegass__tomh",
            "104227__minorr__hhat-paiste-302-14-open-p",
            "116973__cbeeching__hat-light",
            "122557__anillogic__trimo-c3",
            "124101__connersaw8__crash",
            "124382__cubix__8bit-snare",
            "15590__lewis__sabmute",
        )
    ),
    "ElectricEmpireKit/EE_Snare_1.flac",
]
CLIP_SAMPLES = 48000  # 3 s at 16 kHz, the defaults
SIZES = {"train_per_class": 4, "validation_per_class": 2}


def _thresholds(classes: list[str], **overrides) -> ValidationThresholds:
    """Limits for splits of 2-4 clips per class; feature shifts only warn."""
    settings = {
        "min_examples_per_class": 2,
        "max_split_kl_divergence": 1.0,
        "max_duplicate_fraction": 0.0,
        "schema": AUDIO_MANIFEST_SCHEMA,
    }
    return ValidationThresholds(expected_classes=classes, **settings | overrides)


def _validate(prepared: PreparedDataset, docs: Path, **overrides) -> ValidationSummary:
    thresholds = _thresholds(prepared.class_names, **overrides)
    return validate_manifest(prepared.manifest("audio"), thresholds, docs_dir=docs)


def _counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(labels, minlength=num_classes).tolist()


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return target


@pytest.fixture(scope="module", autouse=True)
def _assets() -> None:
    for folder in (RAW_ASTERISK, RAW_DRUMS):
        if not folder.is_dir():
            pytest.fail(f"{folder} is missing: run `make assets` (scripts/fetch_assets.sh)")


@pytest.fixture(scope="module")
def asterisk_copy(tmp_path_factory) -> Path:
    """A small copy of the asterisk folder, with the two kinds of file the reader skips."""
    root = tmp_path_factory.mktemp("asterisk")
    for language in SPOKEN_LANGUAGE_CLASSES:
        for name in (*(f"{prompt}.wav" for prompt in PROMPTS), SUB_FOLDER_PROMPT):
            _copy(RAW_ASTERISK / language / name, root / language / name)
        _copy(RAW_ASTERISK / language / "silence/1.wav", root / language / "silence/1.wav")
    # The package's 44-byte WAV header without samples.
    _copy(RAW_ASTERISK / "ru/is.wav", root / "ru/is.wav")
    return root


@pytest.fixture(scope="module")
def speech_and_drums(tmp_path_factory) -> Path:
    """A user's folder: raw_dir/{speech,drums}/..., 8 prompts and 8 drum hits."""
    root = tmp_path_factory.mktemp("sounds")
    for name in SPEECH:
        _copy(RAW_ASTERISK / name, root / "speech" / name.replace("/", "-"))
    for name in DRUMS:
        _copy(RAW_DRUMS / name, root / "drums" / Path(name).name)
    return root


def _prepare(tmp_path: Path, **prepare) -> tuple[PreparedDataset, PrepareParams, Path]:
    cfg = PrepareParams(**SIZES | prepare)
    dataset_dir = tmp_path / "tfds"
    return prepare_dataset(cfg, dataset_dir), cfg, dataset_dir


# ---------------------------------------------------------------- params


def test_audio_sources_take_the_musicnn_clip_by_default() -> None:
    for dataset, extra in (("spoken_language", {"test_fraction": 0.2}), ("audio_folder", {})):
        cfg = PrepareParams(dataset=dataset, raw_dir="sounds", **extra)
        assert (cfg.modality, cfg.stored_name) == ("audio", dataset)
        assert (cfg.sample_rate, cfg.clip_seconds, cfg.clip_align) == (16000, 3.0, "start")
        assert cfg.clip_padding == "zeros"
    assert FACT_COLUMNS == AUDIO_FACT_COLUMNS  # the reader's facts are the manifest's


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        ({"clip_seconds": 2.0}, "'clip_seconds' does not apply to dataset 'fashion_mnist'"),
        (
            {"dataset": "image_folder", "raw_dir": "photos", "sample_rate": 8000},
            "'sample_rate' does not apply to dataset 'image_folder'; remove it",
        ),
        ({"dataset": "text_file", "raw_dir": "a.csv", "path_column": "file"}, "'path_column'"),
        (
            {
                "dataset": "spoken_language",
                "raw_dir": "a",
                "test_fraction": 0.2,
                "classes": ["a", "b"],
            },
            "'classes' does not apply to dataset 'spoken_language'",
        ),
        ({"dataset": "spoken_language", "test_fraction": 0.2}, "data/raw/asterisk"),
        ({"dataset": "spoken_language", "raw_dir": "a"}, "needs 'test_fraction'"),
        (
            {"dataset": "audio_folder", "raw_dir": "a.csv", "path_column": "label"},
            "path_column and label_column are both 'label'",
        ),
        ({"dataset": "audio_folder", "raw_dir": "a", "clip_align": "end"}, "clip_align"),
        ({"dataset": "audio_folder", "raw_dir": "a", "clip_padding": "mirror"}, "clip_padding"),
        ({"dataset": "audio_folder", "raw_dir": "a", "sample_rate": 4000}, "sample_rate"),
        ({"dataset": "audio_folder", "raw_dir": "a", "clip_seconds": 0}, "clip_seconds"),
        (
            {"dataset": "tfds:speech_commands", "raw_dir": "tfds", "modality": "audio"},
            "use dataset audio_folder",
        ),
    ],
)
def test_audio_keys_that_do_not_fit_are_named(prepare: dict, message: str) -> None:
    with pytest.raises(ParamsError) as raised:
        parse_params({"prepare": prepare})
    text = str(raised.value)
    assert message in text and "\n" not in text, text


# ---------------------------------------------------------------- spoken_language


def test_spoken_language_prepares_and_passes_validation(asterisk_copy, tmp_path) -> None:
    prepared, cfg, dataset_dir = _prepare(
        tmp_path, dataset="spoken_language", raw_dir=str(asterisk_copy), test_fraction=0.25
    )

    languages = SPOKEN_LANGUAGE_CLASSES
    assert prepared.class_names == languages
    assert read_class_names(dataset_dir, "spoken_language") == languages
    # 8 speech prompts per language: 2 held out for test, then 2 validation, 4 train.
    for split, per_class in {"train": 4, "validation": 2, "test": 2}.items():
        clips, labels, sample_rate = read_audio_split(dataset_dir, "spoken_language", split)
        assert clips.shape == (5 * per_class, CLIP_SAMPLES), split
        assert sample_rate == 16000
        assert _counts(labels, 5) == [per_class] * 5, split
        stored = prepared.splits[split][0].waveforms
        np.testing.assert_allclose(clips, stored, atol=1 / 32767)
    manifest = prepared.manifest("audio")
    assert list(manifest.columns) == list(AUDIO_MANIFEST_SCHEMA.columns)
    assert len(manifest) == 40 and manifest["content_hash"].is_unique
    # Silence and the sample-less ru/is.wav are left out; sub-folders are read.
    assert not manifest["path"].str.contains("silence/|is.wav").any()
    assert manifest["path"].str.endswith(SUB_FOLDER_PROMPT).sum() == 5
    assert set(manifest["source_sample_rate"]) == {8000}
    assert (manifest["source_seconds"] > 0).all() and not manifest["is_silent"].any()

    summary = _validate(prepared, tmp_path / "docs")
    assert summary.success, summary.format_report()
    names = {check.name for check in summary.checks}
    audio_checks = ("source_seconds", "source_sample_rate", "not_silent", "clipped_fraction")
    assert {f"records.{name}" for name in audio_checks} <= names


def test_spoken_language_lists_every_speech_prompt_of_the_packages() -> None:
    files = spoken_language_files(RAW_ASTERISK)
    per_language = np.bincount([label for _, label in files]).tolist()
    # The packages' 568 / 527 / 561 / 599 / 576 files, less 10 silences each and ru/is.wav.
    assert per_language == [558, 517, 551, 589, 565]
    assert RAW_ASTERISK / "ru/is.wav" not in {path for path, _ in files}


@pytest.mark.slow
def test_all_prompts_pass_the_gate_with_the_default_thresholds(tmp_path) -> None:
    # The language job's draw: 20 training clips per language, the rest validation / test.
    prepared, _, _ = _prepare(
        tmp_path,
        dataset="spoken_language",
        raw_dir=str(RAW_ASTERISK),
        train_per_class=20,
        validation_per_class=40,
        test_fraction=0.5,
        deduplicate=True,
    )

    assert prepared.duplicates_dropped == 0
    thresholds = ValidationThresholds(
        expected_classes=prepared.class_names,
        max_label_kl_divergence=0.05,
        max_class_ratio=1.5,
        min_examples_per_class=10,
        max_split_kl_divergence=0.5,
        schema=AUDIO_MANIFEST_SCHEMA,
    )
    summary = validate_manifest(prepared.manifest("audio"), thresholds, docs_dir=tmp_path / "docs")
    assert summary.success, summary.format_report()


def test_missing_language_folder_is_named(asterisk_copy, tmp_path) -> None:
    partial = tmp_path / "asterisk"
    shutil.copytree(asterisk_copy / "en", partial / "en")
    with pytest.raises(DataError, match=r"asterisk/es: folder not found \(fetch it with"):
        spoken_language_files(partial)


# ---------------------------------------------------------------- audio_folder


def test_audio_folder_of_speech_and_drums(speech_and_drums, tmp_path) -> None:
    prepared, _, dataset_dir = _prepare(
        tmp_path, dataset="audio_folder", raw_dir=str(speech_and_drums), test_fraction=0.25
    )

    assert read_class_names(dataset_dir, "audio_folder") == ["drums", "speech"]
    for split, per_class in {"train": 4, "validation": 2, "test": 2}.items():
        clips, labels, sample_rate = read_audio_split(dataset_dir, "audio_folder", split)
        assert _counts(labels, 2) == [per_class] * 2, split
        assert clips.shape == (2 * per_class, CLIP_SAMPLES) and sample_rate == 16000
    manifest = prepared.manifest("audio")
    drums = manifest[manifest["label_name"] == "drums"]
    assert set(manifest["source_sample_rate"]) <= {8000, 22050, 44100}
    assert drums["path"].str.startswith("drums/").all()
    assert (drums["source_channels"] >= 1).all()
    summary = _validate(prepared, tmp_path / "docs")
    assert summary.success, summary.format_report()


def test_audio_list_with_own_columns_and_deduplication(speech_and_drums, tmp_path) -> None:
    rows = [(f"speech/{path.name}", "speech") for path in sorted(speech_and_drums.glob("speech/*"))]
    rows += [(f"drums/{path.name}", "drums") for path in sorted(speech_and_drums.glob("drums/*"))]
    rows.append(rows[0])  # the same clip listed twice
    listing = speech_and_drums / "clips.csv"
    pd.DataFrame(rows, columns=["file", "kind"]).to_csv(listing, index=False)

    prepared, _, dataset_dir = _prepare(
        tmp_path,
        dataset="audio_folder",
        raw_dir=str(listing),
        path_column="file",
        label_column="kind",
        classes=["speech", "drums"],
        test_fraction=0.25,
        clip_seconds=1.0,
        clip_align="centre",
        deduplicate=True,
    )

    assert read_class_names(dataset_dir, "audio_folder") == ["speech", "drums"]
    clips, _, _ = read_audio_split(dataset_dir, "audio_folder", "train")
    assert clips.shape == (8, 16000)
    # The repeat is dropped whichever copy test holds.
    assert prepared.duplicates_dropped == 1
    hashes = prepared.manifest("audio")["content_hash"]
    assert hashes.is_unique
    assert audio_content_hash(prepared.splits["train"][0].waveforms[0]) in set(hashes)


# ---------------------------------------------------------------- bad input


def _good_folder(root: Path) -> Path:
    for language in ("en", "fr"):
        for prompt in PROMPTS:
            _copy(RAW_ASTERISK / language / f"{prompt}.wav", root / language / f"{prompt}.wav")
    return root


@pytest.mark.parametrize(
    ("name", "make", "problem"),
    [
        ("empty.wav", lambda path: path.write_bytes(b""), "audio file is empty (0 bytes)"),
        (
            "no-samples.wav",
            lambda path: shutil.copy2(RAW_ASTERISK / "ru/is.wav", path),
            "audio file holds no samples",
        ),
        ("notes.txt", lambda path: path.write_text("not audio"), "not an audio file"),
        ("text.wav", lambda path: path.write_text("RIFF? no."), "not a readable WAV"),
    ],
)
def test_bad_file_stops_prepare_naming_it(tmp_path, name, make, problem) -> None:
    root = _good_folder(tmp_path / "sounds")
    make(root / "fr" / name)
    dataset_dir = tmp_path / "tfds"

    with pytest.raises(DataError) as raised:
        prepare_dataset(
            PrepareParams(dataset="audio_folder", raw_dir=str(root), test_fraction=0.25, **SIZES),
            dataset_dir,
        )

    message = str(raised.value)
    assert message.startswith(str(root / "fr" / name)) and problem in message, message
    assert "\n" not in message
    assert not dataset_dir.exists()


def test_audio_folder_without_test_split_asks_for_test_fraction(tmp_path) -> None:
    root = _good_folder(tmp_path / "sounds")
    with pytest.raises(DataError, match="set prepare.test_fraction"):
        prepare_dataset(
            PrepareParams(dataset="audio_folder", raw_dir=str(root), **SIZES), tmp_path / "tfds"
        )
    assert not (tmp_path / "tfds").exists()


# ---------------------------------------------------------------- the gate


def test_silent_and_clipped_clips_fail_validation_by_name(tmp_path) -> None:
    root = _good_folder(tmp_path / "sounds")
    soundfile.write(root / "en" / "silence.wav", np.zeros(8000, np.int16), 8000)
    square = np.where(np.arange(8000) % 40 < 20, 32767, -32768).astype(np.int16)
    soundfile.write(root / "fr" / "square.wav", square, 8000)
    cfg = {"test_fraction": 0.3, "validation_per_class": 1}
    prepared, _, _ = _prepare(tmp_path, dataset="audio_folder", raw_dir=str(root), **cfg)
    manifest = prepared.manifest("audio")
    silent = manifest.loc[manifest["path"] == "en/silence.wav"].iloc[0]
    assert bool(silent["is_silent"]) and silent["rms_amplitude"] == 0

    summary = _validate(prepared, tmp_path / "docs", min_examples_per_class=1)

    assert not summary.success
    failed = {check.name: check for check in summary.failures}
    assert {"records.not_silent", "records.clipped_fraction"} <= set(failed)
    records = [(r["split"], r["index"]) for r in failed["records.not_silent"].failing_records]
    assert records == [(silent["split"], silent["index"])]
    report = summary.format_report()
    assert "CRITICAL records.not_silent" in report and "CRITICAL records.clipped_fraction" in report
    # A threshold that allows one silent clip in the 14 lets it through.
    allowed = _validate(
        prepared, tmp_path / "docs", min_examples_per_class=1, max_silent_fraction=0.1
    )
    assert "records.not_silent" not in {check.name for check in allowed.failures}
