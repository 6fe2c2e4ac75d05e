"""Classify new inputs with an experiment's fine-tuned model.

    python -m pipelines.predict --params experiments/text/params.yaml "Stale and overpriced."
    python -m pipelines.predict --params experiments/text/params.yaml --file reviews.txt
    python -m pipelines.predict --params params.yaml sneaker.png shirt.jpg
    python -m pipelines.predict --params experiments/audio/params.yaml prompt.wav

A text experiment takes sentences, and with ``--file`` UTF-8 files of one text per line;
an image experiment takes image files (PNG, JPEG, anything Pillow reads), converted to the
stored dataset's channels and size; an audio experiment takes WAV, FLAC or AIFF files,
brought to its sample rate and clip length as ``prepare`` did. Each input gets one line: label, its probability,
and the input. The model is ``models/<experiment>/finetune/model``, its probabilities scaled
by the temperature of ``models/<experiment>/calibration.json`` where the calibrate stage
wrote one; the class names are those stored with the prepared dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.stages.common import ExperimentPaths, params_parser, run_command
from tlflax.calibration import CALIBRATION_FILE_NAME, apply_temperature, read_temperatures
from tlflax.config import Params
from tlflax.data.audio_folder import load_clip
from tlflax.data.errors import DataError
from tlflax.data.sources import clip_settings
from tlflax.data.tfds_store import read_image_shape
from tlflax.errors import MissingInputError
from tlflax.tasks import class_probabilities, task_for

# Longest input echoed back on an output line.
_SHOWN_CHARACTERS = 60


@dataclass(frozen=True)
class Prediction:
    """The most probable class of one input."""

    source: str  # the sentence, "file:line", or the image path
    label: str
    probability: float

    def format(self) -> str:
        shown = self.source.replace("\n", " ")
        if len(shown) > _SHOWN_CHARACTERS:
            shown = shown[: _SHOWN_CHARACTERS - 3] + "..."
        return f"{self.label}\t{self.probability:.3f}\t{shown}"


def read_texts(sentences: Sequence[str], files: Sequence[Path]) -> tuple[list[str], list[str]]:
    """The texts to classify and where each came from: sentences, then each file's lines.

    Blank lines of a file are skipped.

    Raises:
      DataError: naming the file that is missing, not UTF-8 or holds no text, or the blank
        sentence.
    """
    texts, sources = [], []
    for position, sentence in enumerate(sentences, start=1):
        if not sentence.strip():
            raise DataError(f"input {position}", "the text is blank")
        texts.append(sentence)
        sources.append(sentence)
    for path in files:
        try:
            content = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise DataError(path, "no such file") from None
        except UnicodeDecodeError as error:
            raise DataError(path, f"not valid UTF-8 (byte {error.start})") from None
        lines = [(number, line) for number, line in enumerate(content.splitlines(), 1)]
        found = [(number, line) for number, line in lines if line.strip()]
        if not found:
            raise DataError(path, "holds no text")
        texts += [line for _, line in found]
        sources += [f"{path}:{number}" for number, _ in found]
    return texts, sources


def read_images(paths: Sequence[Path], shape: tuple[int, int, int]) -> np.ndarray:
    """Decode image files to uint8 (N, H, W, C) in the stored dataset's ``shape``.

    Images are converted to its channels (grayscale or RGB) and resized to its size, so
    they reach the model as the training images did.

    Raises:
      DataError: naming the file that is missing or not an image Pillow can read.
    """
    height, width, channels = shape
    mode = {1: "L", 3: "RGB"}[channels]
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                converted = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
        except FileNotFoundError:
            raise DataError(path, "no such file") from None
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(path, f"not an image Pillow can read ({error})") from None
        images.append(np.asarray(converted, dtype=np.uint8).reshape(height, width, channels))
    return np.stack(images)


def read_clips(paths: Sequence[Path], params: Params) -> np.ndarray:
    """Decode audio files to float32 (N, samples) at ``prepare``'s rate and clip length.

    Raises:
      DataError: naming the file that is missing or not audio soundfile can read.
    """
    settings = clip_settings(params.prepare)
    clips = []
    for path in paths:
        if not path.is_file():
            raise DataError(path, "no such file")
        clips.append(load_clip(path, path, settings)[0])
    return np.stack(clips)


def read_records(
    params: Params, paths: ExperimentPaths, inputs: Sequence[str], files: Sequence[Path]
) -> tuple[object, list[str]]:
    """The model's records of the inputs (texts, images or clips) and where each came from."""
    modality = params.prepare.modality
    if modality == "text":
        return read_texts(inputs, files)
    if files:
        raise DataError("--file", f"text files are for text experiments; pass {modality} files")
    if not inputs:
        return [], []
    if modality == "audio":
        return read_clips([Path(name) for name in inputs], params), list(inputs)
    shape = read_image_shape(paths.dataset_dir, params.prepare.stored_name)
    return read_images([Path(name) for name in inputs], shape), list(inputs)


def predict(
    params: Params, paths: ExperimentPaths, inputs: Sequence[str], files: Sequence[Path] = ()
) -> list[Prediction]:
    """The fine-tuned model's prediction for each input (see the module docstring).

    Raises:
      DataError: a bad input (named), ``--file`` given to an image experiment, or a
        calibration file without a valid fine-tuned temperature.
      MissingInputError: the experiment has no fine-tuned model yet.
    """
    task = task_for(params, paths.dataset_dir)
    model_path = paths.finetune / "model"
    if not model_path.exists():
        raise MissingInputError(f"{model_path}: no fine-tuned model; run the experiment first")
    records, sources = read_records(params, paths, inputs, files)
    if not sources:
        raise DataError("inputs", "nothing to classify; give sentences, --file, images or clips")
    class_names = task.class_names()
    model, forward = task.load_classifier(len(class_names), model_path)
    temperatures = read_temperatures(paths.finetune.parent / CALIBRATION_FILE_NAME, ["finetune"])
    probabilities = apply_temperature(
        class_probabilities(model, forward, task.model_inputs(records), params.evaluate.batch_size),
        temperatures["finetune"],
    )
    best = probabilities.argmax(axis=1)
    return [
        Prediction(source, class_names[label], float(row[label]))
        for source, label, row in zip(sources, best, probabilities, strict=True)
    ]


def main(argv: Sequence[str] | None = None) -> None:
    parser = params_parser("python -m pipelines.predict", __doc__.split("\n\n")[0])
    parser.add_argument(
        "inputs", nargs="*", help="sentences (text), image files (images) or audio files (audio)"
    )
    parser.add_argument(
        "--file", type=Path, action="append", default=[], help="a text file, one input per line"
    )
    arguments = parser.parse_args(argv)

    def body(params: Params, paths: ExperimentPaths) -> None:
        for prediction in predict(params, paths, arguments.inputs, arguments.file):
            print(prediction.format())

    run_command("predict", arguments.params, body)


if __name__ == "__main__":
    main()
