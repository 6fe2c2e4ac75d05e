"""The ONNX graph being built from a jaxpr: nodes, weights, and the values that flow between.

A jaxpr variable's value while translating (:data:`Value`) is one of

* a numpy array: known at export time (a weight, a literal, or an equation folded by
  evaluating it with JAX); it becomes an initializer only when a node reads it;
* a string: the name of an ONNX tensor of exactly the variable's shape;
* :class:`Broadcasting`: a tensor or array that numpy-broadcasts to the variable's shape but
  is not expanded yet. ``broadcast_in_dim`` gives these (a BatchNorm's per-channel scale
  stretched to the whole batch); elementwise ops read them as they are - ONNX broadcasts
  like numpy - and only an op that needs the full shape expands them (:meth:`exact`).

One dimension may be symbolic (the batch, ``jax.export.symbolic_shape``): shapes that hold
it are computed in the graph from the input that carries it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Arrays up to this many elements are shared by value (literals like 2.0 recur hundreds of times).
_SHARED_CONSTANT_SIZE = 16


class UnsupportedPrimitiveError(NotImplementedError):
    """The inference function uses a primitive the ONNX translation does not cover."""

    def __init__(self, primitive: str, detail: str = ""):
        message = f"ONNX export: primitive {primitive!r} is not supported"
        super().__init__(message + (f" ({detail})" if detail else ""))
        self.primitive = primitive


@dataclass(frozen=True)
class Broadcasting:
    """A tensor name or array that numpy-broadcasts to its variable's shape (see module doc)."""

    value: str | np.ndarray


Value = np.ndarray | str | Broadcasting


def is_constant(value: Value) -> bool:
    """Whether ``value`` is known at export time."""
    return isinstance(value.value if isinstance(value, Broadcasting) else value, np.ndarray)


def constant_value(value: Value, shape: Sequence[int]) -> np.ndarray:
    """The array of a constant ``value`` at its variable's (concrete) ``shape``."""
    if isinstance(value, Broadcasting):
        return np.broadcast_to(value.value, tuple(shape))
    assert isinstance(value, np.ndarray)
    return value


def is_concrete(shape: Sequence[object]) -> bool:
    """Whether every dimension of ``shape`` is a plain integer (none is symbolic)."""
    return all(isinstance(dim, int | np.integer) for dim in shape)


def onnx_dtype(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


class SymbolicDimension:
    """The one symbolic dimension (e.g. the batch) and the graph input axis that carries it."""

    def __init__(self, symbol: str, input_name: str, axis: int):
        self.symbol, self.input_name, self.axis = symbol, input_name, axis

    def linear_form(self, dim: object) -> tuple[int, int]:
        """(k, c) with ``dim`` = k * symbol + c; NotImplementedError if it is not linear."""
        evaluate = dim._evaluate  # jax's symbolic dimension expression
        constant = int(evaluate({self.symbol: 0}))
        slope = int(evaluate({self.symbol: 1})) - constant
        if int(evaluate({self.symbol: 7})) != 7 * slope + constant:
            raise NotImplementedError(f"ONNX export: dimension {dim} is not linear in the batch")
        return slope, constant


class GraphBuilder:
    """Collects the nodes and initializers of one ONNX graph."""

    def __init__(self, symbolic: SymbolicDimension | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.symbolic = symbolic
        self._counter = itertools.count()
        # id(array) -> (array, name): the array is kept so its id is never reused meanwhile.
        self._by_identity: dict[int, tuple[np.ndarray, str]] = {}
        self._by_content: dict[tuple, str] = {}
        self._symbolic_size: str | None = None

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._counter)}"

    def node(
        self, op: str, inputs: Sequence[str], outputs: int = 1, **attributes
    ) -> str | list[str]:
        """Add an ``op`` node; returns its output name (a list when ``outputs`` > 1)."""
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, list(inputs), names, **attributes))
        return names[0] if outputs == 1 else names

    def node_named(self, op: str, inputs: Sequence[str], output: str, **attributes) -> str:
        """Add an ``op`` node whose output has the given name (a graph output)."""
        self.nodes.append(helper.make_node(op, list(inputs), [output], **attributes))
        return output

    def constant(self, array: np.ndarray) -> str:
        """The initializer holding ``array`` (made once per array)."""
        array = np.asarray(array)
        if array.size <= _SHARED_CONSTANT_SIZE:
            key = (array.dtype.str, array.shape, array.tobytes())
            if key not in self._by_content:
                self._by_content[key] = self._add_initializer(array)
            return self._by_content[key]
        known = self._by_identity.get(id(array))
        if known is None:
            known = (array, self._add_initializer(array))
            self._by_identity[id(array)] = known
        return known[1]

    def _add_initializer(self, array: np.ndarray) -> str:
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def int64s(self, values: Sequence[int]) -> str:
        return self.constant(np.asarray(values, np.int64))

    def name(self, value: Value) -> str:
        """A tensor for an op that broadcasts its operands (the value, not expanded)."""
        if isinstance(value, Broadcasting):
            value = value.value
        return value if isinstance(value, str) else self.constant(value)

    def exact(self, value: Value, shape: Sequence[object]) -> str:
        """A tensor of exactly ``shape`` (a :class:`Broadcasting` value expanded)."""
        if not isinstance(value, Broadcasting):
            return self.name(value)
        if isinstance(value.value, np.ndarray) and is_concrete(shape):
            return self.constant(np.array(np.broadcast_to(value.value, tuple(shape))))
        return self.node("Expand", [self.name(value), self.shape(shape)])

    def shape(self, dims: Sequence[object], unknown_as_minus_one: bool = False) -> str:
        """A 1-D int64 tensor holding ``dims``; a symbolic one is computed in the graph,
        or written -1 with ``unknown_as_minus_one`` (a Reshape infers one such)."""
        if is_concrete(dims):
            return self.int64s([int(dim) for dim in dims])
        if unknown_as_minus_one and sum(not is_concrete([dim]) for dim in dims) == 1:
            return self.int64s([int(dim) if is_concrete([dim]) else -1 for dim in dims])
        pieces = [
            self.int64s([int(dim)]) if is_concrete([dim]) else self._dimension(dim) for dim in dims
        ]
        return self.node("Concat", pieces, axis=0)

    def _dimension(self, dim: object) -> str:
        """A 1-D int64 tensor of one element: the symbolic ``dim``'s value in this run."""
        if self.symbolic is None:
            raise NotImplementedError(
                f"ONNX export: symbolic dimension {dim} with no input carrying it"
            )
        if self._symbolic_size is None:
            axis = self.symbolic.axis
            self._symbolic_size = self.node(
                "Shape", [self.symbolic.input_name], start=axis, end=axis + 1
            )
        slope, constant = self.symbolic.linear_form(dim)
        size = self._symbolic_size
        if slope != 1:
            size = self.node("Mul", [size, self.int64s([slope])])
        if constant:
            size = self.node("Add", [size, self.int64s([constant])])
        return size

    def value_info(
        self, name: str, dtype: np.dtype, shape: Sequence[object]
    ) -> onnx.ValueInfoProto:
        """A graph input or output: symbolic dimensions get their symbol's name."""
        dims = [int(dim) if is_concrete([dim]) else str(dim) for dim in shape]
        return helper.make_tensor_value_info(name, onnx_dtype(dtype), dims)
