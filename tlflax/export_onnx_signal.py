"""ONNX translations of the jaxpr primitives of an audio front end and its network: the real
FFT of a log-mel spectrogram (``fft``, then ``real`` and ``imag``) and max pooling
(``reduce_window_max``).

Part of the jaxpr-to-ONNX translation (:mod:`tlflax.export_onnx`). ONNX has no complex
tensors: its ``DFT`` gives a float tensor whose last axis holds the real and the imaginary
part. That pair travels as a :class:`ComplexPair`, which only ``real`` and ``imag`` read;
any other primitive handed one stops the export, naming itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from tlflax.export_onnx_graph import GraphBuilder, UnsupportedPrimitiveError, Value
from tlflax.export_onnx_layout import Rule, shape_of


@dataclass(frozen=True)
class ComplexPair:
    """A complex tensor as ONNX's ``DFT`` gives it: the name of a float tensor of the complex
    one's shape plus a last axis of 2 (real part, imaginary part)."""

    name: str


def _fft(builder: GraphBuilder, eqn, inputs: list[Value]) -> ComplexPair:
    """``jnp.fft.rfft`` along the last axis: ONNX ``DFT`` (opset 17 form), one-sided."""
    fft_type, lengths = eqn.params["fft_type"], tuple(eqn.params["fft_lengths"])
    shape = shape_of(eqn.invars[0])
    if fft_type != jax.lax.FftType.RFFT or len(lengths) != 1 or lengths[0] != shape[-1]:
        raise UnsupportedPrimitiveError(
            "fft", f"only a real FFT over the whole last axis (got {fft_type}, {lengths})"
        )
    signal = builder.exact(inputs[0], shape)
    # DFT reads signals of shape (..., length, 1): a real signal gets a trailing axis.
    real_signal = builder.node("Unsqueeze", [signal, builder.int64s([len(shape)])])
    spectrum = builder.node("DFT", [real_signal], axis=len(shape) - 1, onesided=1)
    return ComplexPair(spectrum)


def _part(index: int, primitive: str) -> Rule:
    """``real`` (index 0) or ``imag`` (index 1) of a :class:`ComplexPair`."""

    def rule(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
        (pair,) = inputs
        if not isinstance(pair, ComplexPair):
            raise UnsupportedPrimitiveError(primitive, "only of an FFT's output")
        part = builder.node("Gather", [pair.name, builder.int64s([index])], axis=-1)
        return builder.node("Squeeze", [part, builder.int64s([-1])])

    return rule


def _reduce_window_max(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    """Max pooling of an (N, H, W, C) tensor: ONNX ``MaxPool`` between two transposes."""
    params = eqn.params
    window, strides = params["window_dimensions"], params["window_strides"]
    padding = [(int(low), int(high)) for low, high in params["padding"]]
    shape = shape_of(eqn.invars[0])
    dilated = any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"]))
    pools_batch_or_channels = any(
        (window[axis], strides[axis], padding[axis]) != (1, 1, (0, 0)) for axis in (0, 3)
    )
    if len(shape) != 4 or dilated or pools_batch_or_channels:
        raise UnsupportedPrimitiveError(
            "reduce_window_max",
            "only undilated pooling over the two middle axes of (N, H, W, C)",
        )
    image = builder.node("Transpose", [builder.exact(inputs[0], shape)], perm=[0, 3, 1, 2])
    pooled = builder.node(
        "MaxPool",
        [image],
        kernel_shape=[int(window[1]), int(window[2])],
        strides=[int(strides[1]), int(strides[2])],
        pads=[padding[1][0], padding[2][0], padding[1][1], padding[2][1]],
    )
    return builder.node("Transpose", [pooled], perm=[0, 2, 3, 1])


SIGNAL_RULES: dict[str, Rule] = {
    "fft": _fft,
    "real": _part(0, "real"),
    "imag": _part(1, "imag"),
    "reduce_window_max": _reduce_window_max,
}
# The primitives that read a ComplexPair; any other is handed one only by mistake.
READS_COMPLEX = frozenset({"real", "imag"})
