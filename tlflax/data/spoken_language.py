"""Read the spoken-language dataset: Asterisk's recorded voice prompts in five languages.

The files come from the Debian packages ``asterisk-core-sounds-{en,es,fr,it,ru}-wav``
1.6.1 (CC-BY-SA-3.0), unpacked by ``make assets`` (``scripts/fetch_assets.sh``) into
``<root>/<language>/``: 8 kHz 16-bit mono WAV prompts, some sorted into sub-folders
(``digits/``, ``letters/``, ...). The class of a clip is its language folder. English and
Spanish are spoken by the same woman, so the language, not the voice, has to be heard.

Two kinds of file are left out, by rule and not by accident:

- ``silence/``: 1 to 10 seconds of near-silence (about -96 dBFS) in every language; no
  speech, so no language to tell, and validation refuses silent clips.
- files without a sample: the Russian package ships ``ru/is.wav`` as a bare 44-byte WAV
  header. The clip reader refuses such a file (rightly, in a user's folder); here it is a
  known defect of the package.

Everything else is read with :func:`~tlflax.data.audio_folder.read_audio_files`, which
names any file it cannot read.
"""

from __future__ import annotations

from pathlib import Path

import soundfile

from tlflax.data.audio_folder import AudioDataset, ClipSettings, read_audio_files
from tlflax.data.errors import DataError

SPOKEN_LANGUAGE_CLASSES: list[str] = ["en", "es", "fr", "it", "ru"]
_NOT_SPEECH_FOLDERS = frozenset({"silence"})
_FETCH_HINT = "fetch it with `make assets` (scripts/fetch_assets.sh)"


def _holds_samples(path: Path) -> bool:
    """False for a well-formed audio file of zero frames (``ru/is.wav``)."""
    try:
        return soundfile.info(path).frames > 0
    except soundfile.LibsndfileError:
        return True  # unreadable: left to the clip reader, which names the file


def spoken_language_files(root: Path) -> list[tuple[Path, int]]:
    """(file, language id) of every speech prompt under ``root``, by language then path.

    Raises:
        DataError: naming a language folder that is missing or holds no prompt.
    """
    files = []
    for label, language in enumerate(SPOKEN_LANGUAGE_CLASSES):
        folder = root / language
        if not folder.is_dir():
            raise DataError(folder, "folder not found", _FETCH_HINT)
        prompts = [
            path
            for path in sorted(folder.rglob("*.wav"))
            if path.relative_to(folder).parts[0] not in _NOT_SPEECH_FOLDERS and _holds_samples(path)
        ]
        if not prompts:
            raise DataError(folder, "holds no voice prompts (*.wav)", _FETCH_HINT)
        files += [(path, label) for path in prompts]
    return files


def read_spoken_language(root: Path, settings: ClipSettings) -> AudioDataset:
    """All speech prompts under ``root`` as clips of ``settings``' rate and length.

    Raises:
        DataError: naming the missing folder or the file that cannot be read.
    """
    return read_audio_files(root, spoken_language_files(root), SPOKEN_LANGUAGE_CLASSES, settings)
