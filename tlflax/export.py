"""A fine-tuned classifier exported for serving: StableHLO (``jax.export``) and ONNX.

What is exported is the task's whole inference forward pass on the records as they are
stored - for images uint8 (N, H, W, C) at the stored size, so the resize to the backbone's
size, the scaling to [0, 1], the grayscale-to-RGB widening (and, where the model was saved
with it, the mirror-image averaging) are inside the graph; for text the token ids and
attention mask. The output is raw logits; temperature scaling is left to the consumer's
softmax. The batch dimension is symbolic: one file serves any batch size.

    program = inference_program(model, forward, {"image": images[:1]})
    stablehlo = export_stablehlo(program)            # bytes; load_stablehlo(stablehlo)(images)
    onnx_model = export_onnx_program(program)        # onnx.ModelProto
    write_export(program, "models/vision/export", description)

:mod:`tlflax.serving` reads the folder back with numpy and onnxruntime alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import onnx
from flax import nnx

from tlflax.export_onnx import export_onnx
from tlflax.io import atomic_path, write_json
from tlflax.models.layers import DepthwiseConv2d
from tlflax.train import Forward

__all__ = [
    "EXPORT_DESCRIPTION_FILE",
    "ONNX_FILE",
    "STABLEHLO_FILE",
    "InferenceProgram",
    "export_onnx_program",
    "export_stablehlo",
    "inference_program",
    "load_stablehlo",
    "write_export",
]

STABLEHLO_FILE = "model.stablehlo"
ONNX_FILE = "model.onnx"
EXPORT_DESCRIPTION_FILE = "export.json"
# The symbol of the batch dimension, in both forms and in export.json's shapes.
BATCH = "batch"
OUTPUT_NAME = "logits"
# Platforms the StableHLO is lowered for: one file serves a CPU or an NVIDIA GPU.
PLATFORMS = ("cpu", "cuda")


@dataclass(frozen=True)
class InferenceProgram:
    """A classifier's inference forward pass as a function of named input arrays."""

    model: nnx.Module
    forward: Forward
    # name -> dtype and shape of one example (the batch dimension excluded), in call order.
    example_shapes: dict[str, jax.ShapeDtypeStruct]

    def input_specs(self, batch: object = None) -> dict[str, jax.ShapeDtypeStruct]:
        """Input shapes with ``batch`` rows (None: the symbolic batch dimension)."""
        if batch is None:
            (batch,) = jax.export.symbolic_shape(BATCH)
        return {
            name: jax.ShapeDtypeStruct((batch, *spec.shape), spec.dtype)
            for name, spec in self.example_shapes.items()
        }

    def function(self, model: nnx.Module | None = None) -> Callable[..., jax.Array]:
        """``f(*inputs) -> logits`` (float32) with the weights (of ``model``) closed over."""
        model = self.model if model is None else model
        names = list(self.example_shapes)

        def logits(*arrays: jax.Array) -> jax.Array:
            batch = dict(zip(names, arrays, strict=True))
            return self.forward(model, batch, False, None).astype(np.float32)

        return logits


def inference_program(
    model: nnx.Module, forward: Forward, example_inputs: Mapping[str, np.ndarray]
) -> InferenceProgram:
    """The program of ``forward`` (inference mode) on inputs shaped like ``example_inputs``
    (arrays of one or more rows, e.g. ``task.model_inputs(records[:1])``)."""
    shapes = {
        name: jax.ShapeDtypeStruct(np.shape(array)[1:], np.asarray(array).dtype)
        for name, array in example_inputs.items()
    }
    return InferenceProgram(model, forward, shapes)


def export_stablehlo(program: InferenceProgram) -> bytes:
    """``jax.export`` of the jitted program, serialized (StableHLO, weights embedded)."""
    exported = jax.export.export(jax.jit(program.function()), platforms=PLATFORMS)
    return bytes(exported(*program.input_specs().values()).serialize())


def load_stablehlo(serialized: bytes) -> Callable[..., jax.Array]:
    """The callable of :func:`export_stablehlo`'s bytes: ``f(*inputs) -> logits``."""
    return jax.export.deserialize(bytearray(serialized)).call


def export_onnx_program(program: InferenceProgram) -> onnx.ModelProto:
    """The program as an ONNX model (opset 18) with inputs named as the program's.

    Depthwise convolutions are exported as grouped convolutions: one ONNX Conv each
    rather than the k*k shifted multiply-adds tlflax runs on a CPU (see
    :func:`tlflax.models.layers.depthwise_conv`); the values agree to rounding.
    """
    model = _with_grouped_depthwise(program.model)
    return export_onnx(program.function(model), program.input_specs(), OUTPUT_NAME)


def _with_grouped_depthwise(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` (sharing its weights) whose depthwise layers use XLA's grouped
    convolution, the form ONNX has an op for."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, DepthwiseConv2d):
            module.impl = "xla"
    return copy


def write_export(
    program: InferenceProgram,
    directory: Path,
    description: Mapping[str, object],
    extra_files: Mapping[str, bytes] | None = None,
) -> dict:
    """Write ``directory`` at once: :data:`STABLEHLO_FILE`, :data:`ONNX_FILE`, the
    ``extra_files`` (e.g. a tokenizer) and :data:`EXPORT_DESCRIPTION_FILE`: ``description``
    (class names, preprocessing, temperature, ...) with the inputs and output added.
    Returns what export.json holds."""
    stablehlo = export_stablehlo(program)
    onnx_bytes = export_onnx_program(program).SerializeToString()
    document = {
        **description,
        "inputs": [
            {"name": name, "shape": [BATCH, *spec.shape], "dtype": str(np.dtype(spec.dtype))}
            for name, spec in program.example_shapes.items()
        ],
        "output": {
            "name": OUTPUT_NAME,
            "shape": [BATCH, _num_classes(program)],
            "dtype": "float32",
        },
        "files": [STABLEHLO_FILE, ONNX_FILE, *(extra_files or {})],
        "stablehlo_platforms": list(PLATFORMS),
    }
    with atomic_path(Path(directory), directory=True) as staging:
        (staging / STABLEHLO_FILE).write_bytes(stablehlo)
        (staging / ONNX_FILE).write_bytes(onnx_bytes)
        for name, content in (extra_files or {}).items():
            (staging / name).write_bytes(content)
        write_json(staging / EXPORT_DESCRIPTION_FILE, document)
    return document


def _num_classes(program: InferenceProgram) -> int:
    shapes = jax.eval_shape(program.function(), *program.input_specs(1).values())
    return int(shapes.shape[-1])
