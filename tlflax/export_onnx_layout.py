"""ONNX translations of the jaxpr primitives that move array elements around: broadcasts,
reshapes, transposes, slices, pads, concatenations, splits and row lookups.

Part of the jaxpr-to-ONNX translation (:mod:`tlflax.export_onnx`); the rules take and give
the values of :mod:`tlflax.export_onnx_graph`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tlflax.export_onnx_graph import (
    Broadcasting,
    GraphBuilder,
    UnsupportedPrimitiveError,
    Value,
    constant_value,
    is_constant,
)

Rule = Callable[[GraphBuilder, object, list[Value]], Value | list[Value]]
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min


def shape_of(var) -> tuple:
    """A jaxpr variable's shape (symbolic dimensions included)."""
    return tuple(var.aval.shape)


def _broadcast_in_dim(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    """New axes only (Unsqueeze); the stretch to the full shape is left to the consumer."""
    (value,) = inputs[:1]
    kept = eqn.params["broadcast_dimensions"]
    new_axes = [axis for axis in range(len(eqn.params["shape"])) if axis not in kept]
    if isinstance(value, Broadcasting):
        value = value.value
    if isinstance(value, np.ndarray):
        result: str | np.ndarray = np.expand_dims(value, new_axes) if new_axes else value
    else:
        result = builder.node("Unsqueeze", [value, builder.int64s(new_axes)]) if new_axes else value
    if shape_of(eqn.invars[0]) == shape_of(eqn.outvars[0]) and not isinstance(
        inputs[0], Broadcasting
    ):
        return result
    return Broadcasting(result)


def _reshape(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    if eqn.params.get("dimensions") is not None:
        raise UnsupportedPrimitiveError("reshape", "with dimensions (a transposing reshape)")
    operand = builder.exact(inputs[0], shape_of(eqn.invars[0]))
    shape = builder.shape(eqn.params["new_sizes"], unknown_as_minus_one=True)
    return builder.node("Reshape", [operand, shape])


def _squeeze(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    (value,) = inputs
    axes = builder.int64s(list(eqn.params["dimensions"]))
    output = builder.node("Squeeze", [builder.name(value), axes])
    return Broadcasting(output) if isinstance(value, Broadcasting) else output


def _transpose(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    perm = [int(axis) for axis in eqn.params["permutation"]]
    if perm == sorted(perm):
        return inputs[0]
    value = inputs[0]
    output = builder.node("Transpose", [builder.name(value)], perm=perm)
    return Broadcasting(output) if isinstance(value, Broadcasting) else output


def _concatenate(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    names = [
        builder.exact(value, shape_of(var)) for value, var in zip(inputs, eqn.invars, strict=True)
    ]
    return builder.node("Concat", names, axis=int(eqn.params["dimension"]))


def _pad(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config) or any(
        low < 0 or high < 0 for low, high, _ in config
    ):
        raise UnsupportedPrimitiveError("pad", "interior or negative padding")
    operand = builder.exact(inputs[0], shape_of(eqn.invars[0]))
    pads = [int(low) for low, _, _ in config] + [int(high) for _, high, _ in config]
    padding_value = builder.name(inputs[1])
    return builder.node("Pad", [operand, builder.int64s(pads), padding_value], mode="constant")


def _slice(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    shape = shape_of(eqn.invars[0])
    operand = builder.exact(inputs[0], shape)
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(shape)
    ends = []
    for limit, dim in zip(limits, shape, strict=True):
        if isinstance(limit, int | np.integer):
            ends.append(int(limit))
        elif limit == dim:  # a symbolic limit: the whole (batch) axis
            ends.append(_INT64_MAX)
        else:
            raise UnsupportedPrimitiveError("slice", f"symbolic limit {limit} short of the axis")
    arguments = [
        builder.int64s([int(start) for start in starts]),
        builder.int64s(ends),
        builder.int64s(list(range(len(shape)))),
        builder.int64s([int(stride) for stride in strides]),
    ]
    return builder.node("Slice", [operand, *arguments])


def _rev(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    operand = builder.exact(inputs[0], shape_of(eqn.invars[0]))
    axes = [int(axis) for axis in eqn.params["dimensions"]]
    arguments = [
        builder.int64s([-1] * len(axes)),
        builder.int64s([_INT64_MIN] * len(axes)),
        builder.int64s(axes),
        builder.int64s([-1] * len(axes)),
    ]
    return builder.node("Slice", [operand, *arguments])


def _split(builder: GraphBuilder, eqn, inputs: list[Value]) -> list[Value]:
    operand = builder.exact(inputs[0], shape_of(eqn.invars[0]))
    sizes, axis = eqn.params["sizes"], int(eqn.params["axis"])
    if all(isinstance(size, int | np.integer) for size in sizes):
        return builder.node(
            "Split", [operand, builder.int64s(sizes)], outputs=len(sizes), axis=axis
        )
    if all(size == sizes[0] for size in sizes):
        return builder.node(
            "Split", [operand], outputs=len(sizes), axis=axis, num_outputs=len(sizes)
        )
    raise UnsupportedPrimitiveError("split", "unequal symbolic sizes")


def _gather(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    """A lookup along one axis, ``x[..., indices, ...]``: an embedding's row lookup
    (``table[ids]``) and an audio front end's framing (``waveform[..., frame_indices]``)."""
    numbers = eqn.params["dimension_numbers"]
    operand_shape, index_shape = shape_of(eqn.invars[0]), shape_of(eqn.invars[1])
    out_rank = len(shape_of(eqn.outvars[0]))
    axes = tuple(numbers.start_index_map)
    if _is_constant_window(eqn, inputs[1]):
        return _constant_window(builder, eqn, inputs)
    lookup = (
        len(axes) == 1
        and tuple(numbers.collapsed_slice_dims) == axes
        and not tuple(getattr(numbers, "operand_batching_dims", ()))
        and index_shape[-1] == 1
    )
    if lookup:
        # ONNX's Gather puts the index axes where the looked-up axis was; so must JAX.
        axis, index_rank = axes[0], len(index_shape) - 1
        whole = tuple(1 if a == axis else dim for a, dim in enumerate(operand_shape))
        lookup = tuple(eqn.params["slice_sizes"]) == whole and tuple(numbers.offset_dims) == (
            *range(axis),
            *range(axis + index_rank, out_rank),
        )
    if not lookup:
        raise UnsupportedPrimitiveError("gather", "only lookups along one axis, x[..., indices]")
    if is_constant(inputs[1]):
        given = constant_value(inputs[1], index_shape)
        indices = builder.constant(np.squeeze(given, -1).astype(np.int64))
    else:
        indices = builder.exact(inputs[1], index_shape)
        indices = builder.node("Squeeze", [indices, builder.int64s([-1])])
    return builder.node("Gather", [builder.exact(inputs[0], operand_shape), indices], axis=axis)


def _is_constant_window(eqn, start: Value) -> bool:
    """A gather that cuts one block at a start known at export (``lax.dynamic_slice`` with
    constant starts, e.g. reflect padding): no axis collapsed, one start vector."""
    numbers = eqn.params["dimension_numbers"]
    out_rank = len(shape_of(eqn.outvars[0]))
    return (
        is_constant(start)
        and tuple(shape_of(eqn.invars[1])) == (len(numbers.start_index_map),)
        and not tuple(numbers.collapsed_slice_dims)
        and not tuple(getattr(numbers, "operand_batching_dims", ()))
        and tuple(numbers.offset_dims) == tuple(range(out_rank))
    )


def _constant_window(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    """``x[..., start:start + size, ...]`` as a Slice; starts clamped into the operand, as
    XLA's gather clamps them."""
    numbers = eqn.params["dimension_numbers"]
    operand_shape, sizes = shape_of(eqn.invars[0]), eqn.params["slice_sizes"]
    axes = [int(axis) for axis in numbers.start_index_map]
    given = constant_value(inputs[1], (len(axes),))
    starts = [
        int(np.clip(int(start), 0, int(operand_shape[axis]) - int(sizes[axis])))
        for start, axis in zip(given, axes, strict=True)
    ]
    ends = [start + int(sizes[axis]) for start, axis in zip(starts, axes, strict=True)]
    operand = builder.exact(inputs[0], operand_shape)
    arguments = [builder.int64s(starts), builder.int64s(ends), builder.int64s(axes)]
    return builder.node("Slice", [operand, *arguments])


LAYOUT_RULES: dict[str, Rule] = {
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": _reshape,
    "squeeze": _squeeze,
    "transpose": _transpose,
    "concatenate": _concatenate,
    "pad": _pad,
    "slice": _slice,
    "rev": _rev,
    "split": _split,
    "gather": _gather,
}
