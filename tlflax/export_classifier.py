"""Export a task's saved classifier with what a server needs to feed it (:mod:`tlflax.export`).

:func:`export_classifier` loads a saved whole-model state (e.g. ``models/vision/finetune/model``)
and writes the export folder: both model forms, the tokenizer of a text model, and
``export.json`` - the inputs, class names, the temperature, and the preprocessing: what
happens before the graph (left to the server: decoding, and for images the conversion to
the stored dataset's channels and size) and what happens inside it.
"""

from __future__ import annotations

from pathlib import Path

from tlflax.export import InferenceProgram, inference_program, write_export
from tlflax.tasks import Task, read_architecture

# export.json's layout; a server checks it before reading the rest.
FORMAT_VERSION = 1
# How the server decodes an image of C channels (Pillow mode), as pipelines/predict.py does.
PILLOW_MODES = {1: "L", 3: "RGB"}
_TOKENIZER_FILE = "tokenizer.json"


def export_classifier(
    task: Task,
    model_path: Path,
    directory: Path,
    *,
    temperature: float | None = None,
    example_split: str = "test",
) -> dict:
    """Export the classifier saved at ``model_path`` (with its folder's architecture.json)
    to ``directory``; returns export.json's content.

    ``temperature``: the calibrated temperature for the server's softmax (None: 1, none
    fitted). The inputs' shapes are those of ``example_split``'s records.

    """
    modality = task.params.prepare.modality
    class_names = task.class_names()
    model, forward = task.load_classifier(len(class_names), model_path)
    records, _ = task.read_split(example_split)
    program = inference_program(model, forward, task.model_inputs(records[:1]))
    description = {
        "format_version": FORMAT_VERSION,
        "experiment": task.params.experiment,
        "modality": modality,
        "backbone": task.params.extract.backbone,
        "class_names": class_names,
        "temperature": 1.0 if temperature is None else float(temperature),
    }
    extra_files = {}
    if modality == "image":
        flip = read_architecture(Path(model_path).parent).get("test_time_flip", False)
        description |= _image_description(task, program, flip)
    elif modality == "audio":
        description |= _audio_description(task, program)
    else:
        description |= _text_description(task)
        extra_files[_TOKENIZER_FILE] = task.tokenizer().to_str().encode("utf-8")
    return write_export(program, directory, description, extra_files)


def _image_description(task: Task, program: InferenceProgram, test_time_flip: bool) -> dict:
    height, width, channels = program.example_shapes["image"].shape
    size = task.params.extract.image_size
    flip = " (predictions averaged with the mirror images')" if test_time_flip else ""
    return {
        "image": {
            "height": height,
            "width": width,
            "channels": channels,
            "pillow_mode": PILLOW_MODES[channels],
            "resample": "bilinear",
        },
        "preprocessing": {
            "before_graph": (
                f"decode the file with Pillow, convert to mode {PILLOW_MODES[channels]!r}, "
                f"resize to {width}x{height} (bilinear): uint8 (batch, {height}, {width}, "
                f"{channels}), as the stored dataset"
            ),
            "in_graph": (
                f"uint8 -> float32 / 255; bilinear resize to {size}x{size} (jax.image.resize); "
                "grayscale repeated to RGB; clipped to [0, 1]; backbone and head"
                f"{flip}; raw logits out"
            ),
        },
    }


def _audio_description(task: Task, program: InferenceProgram) -> dict:
    (samples,) = program.example_shapes["audio"].shape
    prepare = task.params.prepare
    return {
        "audio": {
            "sample_rate": prepare.sample_rate,
            "samples": samples,
            "clip_align": prepare.clip_align,
            "clip_padding": prepare.clip_padding,
        },
        "preprocessing": {
            "before_graph": (
                "decode the file with soundfile, average the channels to mono, resample to "
                f"{prepare.sample_rate} Hz (polyphase, exact ratio), crop or pad to {samples} "
                f"samples (clip_align {prepare.clip_align!r}, clip_padding "
                f"{prepare.clip_padding!r}): float32 (batch, "
                f"{samples}), as the stored dataset"
            ),
            "in_graph": (
                "log-mel spectrogram (real FFT, mel filterbank, log compression), the "
                "network, pooling, head; raw logits out"
            ),
        },
    }


def _text_description(task: Task) -> dict:
    max_length = task.params.extract.max_length
    return {
        "text": {"tokenizer": _TOKENIZER_FILE, "max_length": max_length},
        "preprocessing": {
            "before_graph": (
                f"{_TOKENIZER_FILE} (the encoder's WordPiece tokenizer, padding and truncating "
                f"to {max_length} tokens): input_ids and attention_mask, int32 "
                f"(batch, {max_length})"
            ),
            "in_graph": "encoder, pooling, head; raw logits out",
        },
    }
