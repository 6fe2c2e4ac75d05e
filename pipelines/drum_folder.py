"""Hydrogen drum kits -> an ``audio_folder`` layout split by kit ("your own sounds").

    python -m pipelines.drum_folder data/raw/hydrogen-drumkits data/raw/drums

names each instrument of each ``<kit>/drumkit.xml`` (read as data, nothing in it runs) by
:data:`CLASS_PATTERNS` and hard-links its samples (copies across file systems; audio_folder
refuses symbolic links out of its root) to ``{train,test}/<class>/<kit>/``: the kits
``--test-kits`` names (default :data:`TEST_KITS`) are test, so one drum's takes never
straddle train and test. Instruments of no class (sticks, effects, empty slots; claps: 17
in all, too few) are left out and counted, as are missing files and files shared by two
classes. Written to a temporary folder renamed at the end; a missing source, an existing
destination, a bad drumkit.xml or a class absent from one side: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

EXIT_BAD_INPUT = 2
# First match wins, on the lower-cased name without its parenthesised details (ForzeeStereo
# names the maker, "Custom ..." would read as a tom): hi-hats before cymbals ("Hat Pedal").
CLASS_PATTERNS: tuple[tuple[str, str], ...] = (
    ("hihat", r"hi-?hat|\b[co]?hh\b|\bhat\b"),
    ("cymbal", r"crash|\bride|china|splash|cymbal"),
    ("kick", r"kick|bass ?drum|\bbd\b"),
    ("snare", r"snare"),
    ("tom", r"\btom"),
    ("percussion", r"cowbell|conga|bongo|cajon|djembe|tambourine|agogo|maraca|clave|woodblock|"
                   r"sangban|dunun|kenkeni"),
)  # fmt: skip
# Debian hydrogen-drumkits: a studio kit, an electronic kit and a mixed one (153 hits, every
# class on both sides); the other 11 kits, both percussion kits among them, are train.
TEST_KITS = ("Audiophob", "ElectricEmpireKit", "ForzeeStereo")


class DrumFolderError(Exception):
    """A problem with the source or destination, told in one line."""


def instrument_class(name: str) -> str | None:
    """The coarse class of an instrument name ("Hi-Hat Pedal (Paiste)" -> hihat), or None."""
    text = re.sub(r"\(.*?\)", "", name.lower())
    return next((label for label, pattern in CLASS_PATTERNS if re.search(pattern, text)), None)


def kit_samples(kit: Path, left_out: Counter) -> dict[Path, str]:
    """Sample file -> class for one kit folder; what is left out is counted in ``left_out``."""
    try:
        root = ElementTree.parse(kit / "drumkit.xml").getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise DrumFolderError(f"{kit / 'drumkit.xml'}: cannot be read ({error})") from None
    for node in root.iter():  # newer kits put their elements in a namespace
        node.tag = node.tag.rsplit("}", 1)[-1]
    classes: dict[Path, set[str]] = {}
    for instrument in root.iter("instrument"):
        files = [node.text for node in instrument.iter("filename")]
        label = instrument_class(instrument.findtext("name") or "")
        if label is None:
            left_out["unclassified instruments with samples"] += bool(files)
        for file in files if label else ():
            path = (kit / (file or "")).resolve()
            if not file or not path.is_relative_to(kit.resolve()) or not path.is_file():
                left_out["missing files"] += 1
            else:
                classes.setdefault(path, set()).add(label)
    left_out["files of two classes"] += sum(len(labels) > 1 for labels in classes.values())
    return {path: labels.pop() for path, labels in classes.items() if len(labels) == 1}


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copy2(source, target)


def plan_drum_folder(source: Path, test_kits: tuple[str, ...]) -> tuple[list, Counter]:
    """(sample file, its path in the layout) pairs and the counts of what is left out."""
    kits = sorted(path.parent for path in source.glob("*/drumkit.xml"))
    if not kits:
        raise DrumFolderError(f"{source}: holds no <kit>/drumkit.xml")
    missing = sorted(set(test_kits) - {kit.name for kit in kits})
    if missing:
        raise DrumFolderError(f"{source}: no kit {missing[0]!r} (a folder with a drumkit.xml)")
    left_out: Counter = Counter()
    placements = []
    for kit in kits:
        side = "test" if kit.name in test_kits else "train"
        for path, label in kit_samples(kit, left_out).items():
            placements.append((path, Path(side, label, kit.name, path.relative_to(kit.resolve()))))
    return placements, left_out


def write_drum_folder(source: Path, destination: Path, test_kits: tuple[str, ...]) -> Counter:
    """Write ``destination/{train,test}/<class>/<kit>/<file>``; returns the counts
    ``(side, class)`` and ``("left out", reason)``. Raises DrumFolderError, nothing written."""
    if not source.is_dir():
        raise DrumFolderError(f"{source}: source folder not found")
    if destination.exists():
        raise DrumFolderError(f"{destination}: already exists; remove it or choose another")
    placements, left_out = plan_drum_folder(source, test_kits)
    counts = Counter(target.parts[:2] for _, target in placements)
    for label in sorted({label for _, label in counts}):
        if not counts["train", label] or not counts["test", label]:
            raise DrumFolderError(f"class {label!r} has no files on one side: change --test-kits")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the dataset from other users
    try:
        for path, target in placements:
            _place(path, staging / target)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return counts + Counter({("left out", reason): n for reason, n in left_out.items()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.drum_folder", description=__doc__.splitlines()[0]
    )
    parser.add_argument("source", type=Path, help="the kits, e.g. data/raw/hydrogen-drumkits")
    parser.add_argument("destination", type=Path, help="the audio_folder to write (new)")
    parser.add_argument("--test-kits", nargs="+", default=list(TEST_KITS), metavar="KIT")
    arguments = parser.parse_args(argv)
    try:
        test_kits = tuple(arguments.test_kits)
        counts = write_drum_folder(arguments.source, arguments.destination, test_kits)
    except DrumFolderError as error:
        print(f"drum_folder: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    for (group, label), count in sorted(counts.items()):
        print(f"drum_folder: {group:8} {label:38} {count:4}")
    print(f"drum_folder: wrote {arguments.destination}; test kits: {arguments.test_kits}")


if __name__ == "__main__":
    main()
