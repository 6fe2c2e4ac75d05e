"""Serve an exported classifier with numpy and onnxruntime alone - no JAX, no Flax.

Reads the folder the export stage writes (``models/<experiment>/export``: ``model.onnx``,
``export.json``, a text model's ``tokenizer.json``)::

    python -m tlflax.serving models/vision/export sneaker.png shirt.jpg
    python -m tlflax.serving models/text/export "Stale and overpriced." "Lovely tea."
    python -m tlflax.serving models/audio/export prompt.wav take2.flac

Images are decoded with Pillow and brought to the stored dataset's channels and size as
``pipelines/predict.py`` does (a ``.npy`` file holds ready uint8 (H, W, C) or (N, H, W, C)
arrays); texts are tokenized with the exported tokenizer; sound files are decoded, mixed to
mono, resampled and cropped or padded by ``prepare``'s own reader
(:mod:`tlflax.data.audio_folder`; a ``.npy`` file holds ready float32 (samples,) or (N,
samples)). Each input gets one line: label,
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

    def read_clips(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Sound files (or ``.npy`` arrays) as float32 (N, samples): read by ``prepare``'s
        own reader (:func:`tlflax.data.audio_folder.load_clip`, no JAX), as it stored the
        training clips."""
        from tlflax.data.audio_folder import ClipSettings, load_clip
        from tlflax.data.errors import DataError

        settings = self.description["audio"]
        samples, rate = settings["samples"], settings["sample_rate"]
        # Exports made before clip_padding existed padded with zeros.
        padding = settings.get("clip_padding", "zeros")
        clip = ClipSettings(rate, samples / rate, settings["clip_align"], padding)
        clips = []
        for path in map(Path, paths):
            if path.suffix == ".npy":
                clips.extend(_read_array(path, (samples,), np.float32))
                continue
            try:
                clips.append(load_clip(path, path, clip)[0])
            except DataError as error:
                raise ServingError(str(error)) from None
        return np.stack(clips)

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
            sources = _array_sources(inputs, len(arrays["image"]), example_rank=3)
        elif self.modality == "audio":
            arrays = {"audio": self.read_clips(inputs)}
            sources = _array_sources(inputs, len(arrays["audio"]), example_rank=1)
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


def _read_array(path: Path, shape: tuple[int, ...], dtype: type = np.uint8) -> list[np.ndarray]:
    """The examples of a ``.npy`` file holding one example of ``shape`` or a batch of them."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ServingError(f"{path}: not a numpy array file ({error})") from None
    batch = array[None] if array.ndim == len(shape) else array
    if batch.ndim != len(shape) + 1 or batch.shape[1:] != shape or batch.dtype != dtype:
        raise ServingError(
            f"{path}: holds {array.dtype} {array.shape}; expected {np.dtype(dtype)} {shape} "
            f"or (N, {', '.join(map(str, shape))})"
        )
    return list(batch)


def _array_sources(inputs: Sequence[str], count: int, *, example_rank: int) -> list[str]:
    """One source per example: a path, or "path[i]" for each example of a ``.npy`` batch
    (whose examples have ``example_rank`` axes)."""
    sources = []
    for name in inputs:
        if Path(name).suffix != ".npy":
            sources.append(name)
            continue
        rows = np.load(name, mmap_mode="r").shape
        single = len(rows) == example_rank
        sources += [name] if single else [f"{name}[{i}]" for i in range(rows[0])]
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
    parser.add_argument(
        "inputs", nargs="*", help="image or sound files (.npy arrays too), or texts"
    )
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
