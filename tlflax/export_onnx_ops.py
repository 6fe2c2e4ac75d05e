"""ONNX translations of the jaxpr primitives the tlflax classifiers run in inference:
arithmetic, reductions, products and convolutions (array layout: :mod:`tlflax.export_onnx_layout`).

Each rule takes the graph builder, the equation and its input values (see
:mod:`tlflax.export_onnx_graph`) and returns the equation's output values. Equations whose
inputs are all known at export time never reach a rule: they are evaluated with JAX
(:mod:`tlflax.export_onnx`), which removes the resize weights, BatchNorm arithmetic on
weights, iotas and the like. A primitive with no rule here stops the export with
:class:`UnsupportedPrimitiveError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tlflax.export_onnx_graph import (
    Broadcasting,
    GraphBuilder,
    UnsupportedPrimitiveError,
    Value,
    onnx_dtype,
)
from tlflax.export_onnx_layout import LAYOUT_RULES, Rule, shape_of
from tlflax.export_onnx_signal import SIGNAL_RULES


def _result(output: str, inputs: Sequence[Value], invars: Sequence, out_var) -> Value:
    """``output`` of an op that broadcasts like numpy: a :class:`Broadcasting` value unless
    some operand had the full shape (or the result is a scalar)."""
    out_shape = shape_of(out_var)
    full = any(
        not isinstance(value, Broadcasting) and shape_of(var) == out_shape
        for value, var in zip(inputs, invars, strict=True)
    )
    return output if full or not out_shape else Broadcasting(output)


def _elementwise(op: str, **attributes) -> Rule:
    """An op that broadcasts like numpy: it reads :class:`Broadcasting` operands as they are."""

    def rule(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
        output = builder.node(op, [builder.name(value) for value in inputs], **attributes)
        return _result(output, inputs, eqn.invars, eqn.outvars[0])

    return rule


def _unary(*ops: str, **attributes) -> Rule:
    """Unary ops applied in turn (e.g. rsqrt = Reciprocal(Sqrt(x)))."""

    def rule(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
        (value,) = inputs
        name = builder.name(value)
        for op in ops:
            name = builder.node(op, [name], **attributes)
        return Broadcasting(name) if isinstance(value, Broadcasting) else name

    return rule


def _with_scalar(first: str, op: str, scalar: float) -> Rule:
    """``op(first(x), scalar)`` or, with no ``first``, ``op(x, scalar)``: log1p, expm1."""

    def rule(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
        (value,) = inputs
        name = builder.name(value)
        if first:
            name = builder.node(first, [name])
        constant = builder.constant(np.asarray(scalar, eqn.invars[0].aval.dtype))
        output = builder.node(op, [name, constant])
        return Broadcasting(output) if isinstance(value, Broadcasting) else output

    return rule


def _log1p(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    return _unary("Log")(builder, eqn, [_with_scalar("", "Add", 1.0)(builder, eqn, inputs)])


def _erfc(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    (value,) = inputs
    one = builder.constant(np.asarray(1, eqn.invars[0].aval.dtype))
    output = builder.node("Sub", [one, builder.node("Erf", [builder.name(value)])])
    return Broadcasting(output) if isinstance(value, Broadcasting) else output


def _identity(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value | list[Value]:
    return inputs if eqn.primitive.multiple_results else inputs[0]


def _not_equal(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    return _unary("Not")(builder, eqn, [_elementwise("Equal")(builder, eqn, inputs)])


def _logical(logical_op: str, bitwise_op: str) -> Rule:
    def rule(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
        is_bool = eqn.invars[0].aval.dtype == np.bool_
        return _elementwise(logical_op if is_bool else bitwise_op)(builder, eqn, inputs)

    return rule


def _convert_element_type(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    return _unary("Cast", to=onnx_dtype(eqn.params["new_dtype"]))(builder, eqn, inputs)


def _square(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    (value,) = inputs
    output = builder.node("Mul", [builder.name(value), builder.name(value)])
    return Broadcasting(output) if isinstance(value, Broadcasting) else output


def _integer_pow(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    exponent = eqn.params["y"]
    if exponent == 1:
        return inputs[0]
    if exponent == 2:
        return _square(builder, eqn, inputs)
    (value,) = inputs
    power = builder.constant(np.asarray(exponent, eqn.invars[0].aval.dtype))
    output = builder.node("Pow", [builder.name(value), power])
    return Broadcasting(output) if isinstance(value, Broadcasting) else output


def _select_n(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    predicate, *cases = inputs
    if len(cases) != 2 or eqn.invars[0].aval.dtype != np.bool_:
        raise UnsupportedPrimitiveError("select_n", "only a boolean choice between two cases")
    # select_n(p, on_false, on_true) = Where(p, on_true, on_false).
    names = [builder.name(value) for value in (predicate, cases[1], cases[0])]
    return _result(builder.node("Where", names), inputs, eqn.invars, eqn.outvars[0])


def _clamp(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    low, value, high = (builder.name(value) for value in inputs)
    output = builder.node("Min", [builder.node("Max", [value, low]), high])
    return _result(output, inputs, eqn.invars, eqn.outvars[0])


def _reduce(op: str) -> Rule:
    def rule(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
        operand = builder.exact(inputs[0], shape_of(eqn.invars[0]))
        axes = builder.int64s(list(eqn.params["axes"]))
        return builder.node(op, [operand, axes], keepdims=0)

    return rule


def _argmax(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    operand = builder.exact(inputs[0], shape_of(eqn.invars[0]))
    (axis,) = eqn.params["axes"]
    index = builder.node("ArgMax", [operand], axis=int(axis), keepdims=0)
    return builder.node("Cast", [index], to=onnx_dtype(eqn.params["index_dtype"]))


def _dot_general(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    lhs_var, rhs_var = eqn.invars
    lhs_rank, rhs_rank = len(shape_of(lhs_var)), len(shape_of(rhs_var))
    lhs, rhs = inputs
    if not lhs_batch and rhs_rank == 2 and tuple(lhs_contract) == (lhs_rank - 1,):
        if isinstance(rhs, np.ndarray):
            kernel = builder.constant(rhs.T if tuple(rhs_contract) == (1,) else rhs)
        else:
            kernel = builder.exact(rhs, shape_of(rhs_var))
            if tuple(rhs_contract) == (1,):  # x @ w.T
                kernel = builder.node("Transpose", [kernel], perm=[1, 0])
        product = builder.node("MatMul", [builder.exact(lhs, shape_of(lhs_var)), kernel])
        return _cast_to_output(builder, eqn, product)
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lhs_letters = [next(letters) for _ in range(lhs_rank)]
    rhs_letters = [next(letters) for _ in range(rhs_rank)]
    for left, right in [
        *zip(lhs_contract, rhs_contract, strict=True),
        *zip(lhs_batch, rhs_batch, strict=True),
    ]:
        rhs_letters[right] = lhs_letters[left]
    batch = [lhs_letters[axis] for axis in lhs_batch]
    lhs_free = [c for i, c in enumerate(lhs_letters) if i not in (*lhs_contract, *lhs_batch)]
    rhs_free = [c for i, c in enumerate(rhs_letters) if i not in (*rhs_contract, *rhs_batch)]
    equation = (
        f"{''.join(lhs_letters)},{''.join(rhs_letters)}->{''.join(batch + lhs_free + rhs_free)}"
    )
    names = [builder.exact(lhs, shape_of(lhs_var)), builder.exact(rhs, shape_of(rhs_var))]
    return _cast_to_output(builder, eqn, builder.node("Einsum", names, equation=equation))


def _cast_to_output(builder: GraphBuilder, eqn, name: str) -> str:
    if eqn.outvars[0].aval.dtype == eqn.invars[0].aval.dtype:
        return name
    return builder.node("Cast", [name], to=onnx_dtype(eqn.outvars[0].aval.dtype))


def _conv_general_dilated(builder: GraphBuilder, eqn, inputs: list[Value]) -> Value:
    params = eqn.params
    if any(d != 1 for d in params["lhs_dilation"]) or params["batch_group_count"] != 1:
        raise UnsupportedPrimitiveError("conv_general_dilated", "lhs dilation or batch groups")
    padding = [(int(low), int(high)) for low, high in params["padding"]]
    if any(low < 0 or high < 0 for low, high in padding):
        raise UnsupportedPrimitiveError("conv_general_dilated", "negative padding")
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    image = _permuted(builder, inputs[0], shape_of(eqn.invars[0]), lhs_spec)
    kernel = _permuted(builder, inputs[1], shape_of(eqn.invars[1]), rhs_spec)
    output = builder.node(
        "Conv",
        [image, kernel],
        strides=[int(s) for s in params["window_strides"]],
        pads=[low for low, _ in padding] + [high for _, high in padding],
        dilations=[int(d) for d in params["rhs_dilation"]],
        group=int(params["feature_group_count"]),
    )
    back = [int(axis) for axis in np.argsort(out_spec)]
    return output if back == sorted(back) else builder.node("Transpose", [output], perm=back)


def _permuted(
    builder: GraphBuilder, value: Value, shape: Sequence[object], perm: Sequence[int]
) -> str:
    perm = [int(axis) for axis in perm]
    if isinstance(value, np.ndarray):
        return builder.constant(np.ascontiguousarray(np.transpose(value, perm)))
    name = builder.exact(value, shape)
    return name if perm == sorted(perm) else builder.node("Transpose", [name], perm=perm)


RULES: dict[str, Rule] = {
    **{
        name: _elementwise(op)
        for name, op in [
            ("add", "Add"),
            ("sub", "Sub"),
            ("mul", "Mul"),
            ("div", "Div"),
            ("max", "Max"),
            ("min", "Min"),
            ("pow", "Pow"),
            ("gt", "Greater"),
            ("lt", "Less"),
            ("eq", "Equal"),
            ("ge", "GreaterOrEqual"),
            ("le", "LessOrEqual"),
        ]
    },
    "rem": _elementwise("Mod", fmod=1),
    "ne": _not_equal,
    "and": _logical("And", "BitwiseAnd"),
    "or": _logical("Or", "BitwiseOr"),
    "not": _unary("Not"),
    **{
        name: _unary(op)
        for name, op in [
            ("neg", "Neg"),
            ("exp", "Exp"),
            ("log", "Log"),
            ("tanh", "Tanh"),
            ("erf", "Erf"),
            ("logistic", "Sigmoid"),
            ("abs", "Abs"),
            ("sqrt", "Sqrt"),
            ("sign", "Sign"),
            ("floor", "Floor"),
            ("ceil", "Ceil"),
            ("sin", "Sin"),
            ("cos", "Cos"),
        ]
    },
    "rsqrt": _unary("Sqrt", "Reciprocal"),
    "square": _square,
    "integer_pow": _integer_pow,
    "log1p": _log1p,
    "erfc": _erfc,
    "expm1": _with_scalar("Exp", "Sub", 1.0),
    "convert_element_type": _convert_element_type,
    "select_n": _select_n,
    "clamp": _clamp,
    "reduce_sum": _reduce("ReduceSum"),
    "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"),
    "reduce_prod": _reduce("ReduceProd"),
    "argmax": _argmax,
    **LAYOUT_RULES,
    **SIGNAL_RULES,
    "dot_general": _dot_general,
    "conv_general_dilated": _conv_general_dilated,
    **{
        name: _identity
        for name in (
            "stop_gradient",
            "reduce_precision",
            "copy",
            "copy_p",
            "optimization_barrier",
        )
    },
}
