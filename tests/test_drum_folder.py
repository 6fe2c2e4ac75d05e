"""pipelines/drum_folder.py: Hydrogen kits -> an audio_folder layout split by kit, on a tiny
fake pair of kits, and on the Debian hydrogen-drumkits when they are unpacked."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

from pipelines.drum_folder import (
    EXIT_BAD_INPUT,
    TEST_KITS,
    instrument_class,
    main,
    plan_drum_folder,
    write_drum_folder,
)
from tests.conftest import ROOT
from tlflax.data.audio_folder import ClipSettings, read_audio_splits

RAW_DRUMKITS = ROOT / "data/raw/hydrogen-drumkits"
NAMESPACE = ' xmlns="http://www.hydrogen-music.org/drumkit"'


def _kit(root: Path, name: str, instruments: dict[str, list[str]], namespace: str = "") -> None:
    """A kit folder: its drumkit.xml and a 0.05 s WAV for each file that is named."""
    kit = root / name
    kit.mkdir(parents=True)
    entries = "".join(
        f"<instrument><name>{instrument}</name>"
        + "".join(f"<layer><filename>{file}</filename></layer>" for file in files)
        + "</instrument>"
        for instrument, files in instruments.items()
    )
    xml = f"<drumkit_info{namespace}><instrumentList>{entries}</instrumentList></drumkit_info>"
    (kit / "drumkit.xml").write_text(xml, encoding="utf-8")
    for index, file in enumerate(file for files in instruments.values() for file in files):
        if file != "missing.wav":
            tone = np.sin(np.linspace(0, 60 * (index + 1), 2205)) * 0.5
            soundfile.write(kit / file, tone.astype(np.float32), 44100, subtype="PCM_16")


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    root = tmp_path / "kits"
    _kit(
        root,
        "Garage Kit",
        {"Kick (22 inch)": ["kick.wav", "missing.wav"], "Snare": ["snare.wav"], "FX": ["fx.wav"]},
    )
    _kit(root, "Studio", {"BassDrum": ["bd.wav"], "Snare Rimshot": ["rim.wav"]}, NAMESPACE)
    return root


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ('Hi-Hat Pedal (Paiste Alpha Metal edge 14")', "hihat"),
        ("Side OHH", "hihat"),
        ('Crash/Ride Bell (Paiste Rude Crash/Ride 18")', "cymbal"),
        ('Ride (Custom, Zagrebin 22")', "cymbal"),
        ("c3 - bass drum 1", "kick"),
        ("Snare Roll", "snare"),
        ("tomhi2", "tom"),
        ("Djembe1 Slap", "percussion"),
        ("Hand Clap", None),
        ("Stick", None),
        ("Sample: beats_08-37.flac", None),
    ],
)
def test_instrument_names_map_to_coarse_classes(name: str, label: str | None) -> None:
    assert instrument_class(name) == label


def test_kits_go_whole_to_one_side_and_audio_folder_reads_them(kits: Path, tmp_path: Path) -> None:
    destination = tmp_path / "drums"
    counts = write_drum_folder(kits, destination, ("Studio",))
    assert counts == Counter(
        {
            ("train", "kick"): 1,
            ("train", "snare"): 1,
            ("test", "kick"): 1,
            ("test", "snare"): 1,
            ("left out", "missing files"): 1,
            ("left out", "unclassified instruments with samples"): 1,
        }
    )
    written = sorted(
        path.relative_to(destination).as_posix() for path in destination.rglob("*.wav")
    )
    assert written == [
        "test/kick/Studio/bd.wav",
        "test/snare/Studio/rim.wav",
        "train/kick/Garage Kit/kick.wav",
        "train/snare/Garage Kit/snare.wav",
    ]
    assert (destination / written[0]).read_bytes() == (kits / "Studio/bd.wav").read_bytes()
    splits = read_audio_splits(destination, ClipSettings(clip_seconds=0.1))
    assert splits["train"].class_names == splits["test"].class_names == ["kick", "snare"]
    assert [len(split.labels) for split in splits.values()] == [2, 2]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{tmp}/nowhere", "{tmp}/drums"], "source folder not found"),
        (["{kits}", "{kits}"], "already exists"),
        (["{kits}", "{tmp}/drums", "--test-kits", "Nope"], "no kit 'Nope'"),
        (["{kits}", "{tmp}/drums", "--test-kits", "Studio", "Garage Kit"], "no files on one side"),
    ],
)
def test_bad_input_stops_with_one_line_and_writes_nothing(
    kits: Path, tmp_path: Path, capsys: pytest.CaptureFixture, arguments: list[str], message: str
) -> None:
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stopped:
        main([argument.format(tmp=tmp_path, kits=kits) for argument in arguments])
    assert stopped.value.code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith("drum_folder: error: ") and message in error
    assert len(error.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.skipif(not RAW_DRUMKITS.is_dir(), reason="hydrogen-drumkits not unpacked")
def test_the_debian_kits_split_by_kit_with_every_class_on_both_sides() -> None:
    placements, left_out = plan_drum_folder(RAW_DRUMKITS, TEST_KITS)
    counts = Counter(target.parts[:2] for _, target in placements)
    assert {label: counts["train", label] for _, label in counts} == {
        "cymbal": 81, "hihat": 96, "kick": 36, "percussion": 80, "snare": 62, "tom": 60,
    }  # fmt: skip
    assert {label: counts["test", label] for _, label in counts} == {
        "cymbal": 38, "hihat": 29, "kick": 18, "percussion": 23, "snare": 27, "tom": 18,
    }  # fmt: skip
    sides_of_kit: dict[str, set[str]] = {}
    for _, target in placements:
        sides_of_kit.setdefault(target.parts[2], set()).add(target.parts[0])
    assert all(len(sides) == 1 for sides in sides_of_kit.values())
    assert {kit for kit, sides in sides_of_kit.items() if sides == {"test"}} == set(TEST_KITS)
    assert len(sides_of_kit) == 14 and left_out["missing files"] == 1
