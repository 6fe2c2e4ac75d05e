"""Serve an exported classifier with numpy and onnxruntime alone - no JAX, no Flax.

Reads the folder the export stage writes (``models/<experiment>/export``: ``model.onnx``,
``export.json``, a text model's ``tokenizer.json``)::

    python -m tlflax.serving models/vision/export sneaker.png shirt.jpg
    python -m tlflax.serving models/text/export "Stale and overpriced." "Lovely tea."

Images are decoded with Pillow and brought to the stored dataset's channels and size as
``pipelines/predict.py`` does (a ``.npy`` file holds ready uint8 (H, W, C) or (N, H, W, C)
arrays); texts are tokenized with the exported tokenizer. Each input gets one line: label,
its probability (softmax of the logits divided by the calibrated temperature), and the
input. Bad input - an unreadable image, an empty text, an array of the wrong shape - is one
line naming it, exit status 2.

From Python: ``ExportedClassifier(folder).predict(["a.png"])`` or ``.probabilities(arrays)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime

from tlflax.errors import InputError

EXIT_BAD_INPUT = 2
# The export.json layout this reader understands (tlflax.export_classifier.FORMAT_VERSION).
FORMAT_VERSION = 1
# Longest input echoed back on an output line.
_SHOWN_CHARACTERS = 60


class ServingError(InputError):
    """A bad input or export folder; the message names it."""


class ExportedClassifier:
    """An exported classifier: its ONNX model, class names, temperature and preprocessing."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        description_file = self.directory / "export.json"
        try:
            self.description = json.loads(description_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ServingError(f"{description_file}: no such file; run the export stage") from None
        except json.JSONDecodeError as error:
            raise ServingError(f"{description_file}: not JSON ({error})") from None
        if self.description.get("format_version") != FORMAT_VERSION:
            raise ServingError(f"{description_file}: format_version is not {FORMAT_VERSION}")
        self.class_names: list[str] = self.description["class_names"]
        self.temperature = float(self.description.get("temperature") or 1.0)
        self.modality: str = self.description["modality"]
        self.session = onnxruntime.InferenceSession(
            str(self.directory / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        self._tokenizer = None

    def logits(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Raw logits (N, classes) of model-ready arrays, checked against export.json."""
        feed = {}
        for spec in self.description["inputs"]:
            name = spec["name"]
            if name not in inputs:
                raise ServingError(f"input {name!r}: missing")
            array = np.asarray(inputs[name])
            expected = tuple(spec["shape"][1:])
            if array.ndim != len(spec["shape"]) or array.shape[1:] != expected:
                raise ServingError(
                    f"input {name!r}: shape {array.shape}, expected (batch, "
                    f"{', '.join(map(str, expected))})"
                )
            if array.dtype != np.dtype(spec["dtype"]):
                raise ServingError(f"input {name!r}: dtype {array.dtype}, expected {spec['dtype']}")
            feed[name] = array
        return self.session.run(None, feed)[0]

    def probabilities(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """Class probabilities: softmax(logits / temperature), float32 (N, classes)."""
        scaled = self.logits(inputs).astype(np.float64) / self.temperature
        scaled -= scaled.max(axis=1, keepdims=True)
        exponentials = np.exp(scaled)
        return (exponentials / exponentials.sum(axis=1, keepdims=True)).astype(np.float32)

    def read_images(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Image files (or ``.npy`` arrays) as uint8 (N, H, W, C) at the model's input size."""
        from PIL import Image, UnidentifiedImageError

        settings = self.description["image"]
        size, mode = (settings["width"], settings["height"]), settings["pillow_mode"]
        shape = (settings["height"], settings["width"], settings["channels"])
        images = []
        for path in map(Path, paths):
            if path.suffix == ".npy":
                images.extend(_read_array(path, shape))
                continue
            try:
                with Image.open(path) as image:
                    converted = image.convert(mode).resize(size, Image.Resampling.BILINEAR)
            except FileNotFoundError:
                raise ServingError(f"{path}: no such file") from None
            except (UnidentifiedImageError, OSError) as error:
                raise ServingError(f"{path}: not an image Pillow can read ({error})") from None
            images.append(np.asarray(converted, dtype=np.uint8).reshape(shape))
        return np.stack(images)

    def encode_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """``input_ids`` and ``attention_mask``, int32 (N, max_length), of the exported tokenizer."""
        for position, text in enumerate(texts, start=1):
            if not text.strip():
                raise ServingError(f"input {position}: the text is blank")
        if self._tokenizer is None:
            import tokenizers

            tokenizer_file = self.directory / self.description["text"]["tokenizer"]
            self._tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": np.array([encoding.ids for encoding in encodings], np.int32),
            "attention_mask": np.array(
                [encoding.attention_mask for encoding in encodings], np.int32
            ),
        }

    def predict(self, inputs: Sequence[str]) -> list[tuple[str, str, float]]:
        """(input, label, probability) for image paths or texts, by the model's modality."""
        if not inputs:
            raise ServingError("inputs: nothing to classify; give image files or texts")
        if self.modality == "image":
            arrays = {"image": self.read_images(inputs)}
            sources = _image_sources(inputs, len(arrays["image"]))
        elif self.modality == "text":
            arrays, sources = self.encode_texts(inputs), list(inputs)
        else:
            raise ServingError(f"{self.directory}: cannot serve {self.modality!r} models")
        probabilities = self.probabilities(arrays)
        best = probabilities.argmax(axis=1)
        return [
            (source, self.class_names[label], float(row[label]))
            for source, label, row in zip(sources, best, probabilities, strict=True)
        ]


def _read_array(path: Path, shape: tuple[int, int, int]) -> list[np.ndarray]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ServingError(f"{path}: not a numpy array file ({error})") from None
    batch = array[None] if array.ndim == 3 else array
    if batch.ndim != 4 or batch.shape[1:] != shape or batch.dtype != np.uint8:
        raise ServingError(
            f"{path}: holds {array.dtype} {array.shape}; expected uint8 {shape} or (N, {', '.join(map(str, shape))})"
        )
    return list(batch)


def _image_sources(inputs: Sequence[str], count: int) -> list[str]:
    """One source per image: a path, or "path[i]" for each image of a ``.npy`` batch."""
    sources = []
    for name in inputs:
        if Path(name).suffix != ".npy":
            sources.append(name)
            continue
        rows = np.load(name, mmap_mode="r").shape
        sources += [name] if len(rows) == 3 else [f"{name}[{i}]" for i in range(rows[0])]
    assert len(sources) == count
    return sources


def format_prediction(source: str, label: str, probability: float) -> str:
    shown = source.replace("\n", " ")
    if len(shown) > _SHOWN_CHARACTERS:
        shown = shown[: _SHOWN_CHARACTERS - 3] + "..."
    return f"{label}\t{probability:.3f}\t{shown}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tlflax.serving", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("export_dir", help="the export stage's folder, e.g. models/vision/export")
    parser.add_argument("inputs", nargs="*", help="image files (.npy arrays too) or texts")
    arguments = parser.parse_args(argv)
    try:
        classifier = ExportedClassifier(arguments.export_dir)
        predictions = classifier.predict(arguments.inputs)
    except ServingError as error:
        print(f"serving: error: {error}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    for prediction in predictions:
        print(format_prediction(*prediction))


if __name__ == "__main__":
    main()
