"""A JAX function to an ONNX model, by translating its jaxpr (no TensorFlow, no jax2onnx).

:func:`export_onnx` traces the function with :func:`jax.make_jaxpr` (the batch dimension may
be symbolic, ``jax.export.symbolic_shape``) and walks the equations:

* an equation whose inputs are all known at export time (weights, literals, what earlier
  such equations gave) is evaluated with JAX there and then: resize weights, BatchNorm
  arithmetic on its statistics, iotas and masks become plain ONNX initializers;
* calls (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ...) are inlined;
* every other equation is translated by its primitive's rule (:mod:`tlflax.export_onnx_ops`);
  one with no rule stops the export with :class:`UnsupportedPrimitiveError`, naming it.

Float32 throughout; ONNX opset 18.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
import onnx
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal
from onnx import helper

from tlflax.export_onnx_graph import (
    Broadcasting,
    GraphBuilder,
    SymbolicDimension,
    UnsupportedPrimitiveError,
    Value,
    constant_value,
    is_concrete,
    is_constant,
)
from tlflax.export_onnx_ops import RULES
from tlflax.export_onnx_signal import READS_COMPLEX, ComplexPair

__all__ = ["OPSET", "UnsupportedPrimitiveError", "export_onnx", "jaxpr_to_onnx"]

OPSET = 18
# ONNX Runtime 1.20+ reads IR version 10 (the onnx package would otherwise write its newest).
_IR_VERSION = 10
# Primitives that call a jaxpr on their inputs (inlined), and where each keeps it. Loops
# (scan, while) also hold jaxprs but are not calls: they have no rule.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}
# Evaluated lazily by their rule, never folded: folding would store the stretched array.
_NEVER_FOLDED = {"broadcast_in_dim"}


def export_onnx(
    function: Callable[..., jax.Array],
    input_specs: Mapping[str, jax.ShapeDtypeStruct],
    output_name: str = "logits",
) -> onnx.ModelProto:
    """``function(*inputs)`` (inputs in ``input_specs``' order, one array out) as ONNX.

    The graph's inputs take ``input_specs``' names, dtypes and shapes (a symbolic dimension
    becomes a named ONNX dimension); arrays the function closes over become initializers.

    Raises:
      UnsupportedPrimitiveError: the function uses a primitive with no ONNX rule.
    """
    closed = jax.make_jaxpr(function)(*input_specs.values())
    return jaxpr_to_onnx(closed, list(input_specs), output_name)


def jaxpr_to_onnx(
    closed: ClosedJaxpr, input_names: Sequence[str], output_name: str = "logits"
) -> onnx.ModelProto:
    """The ONNX model of a traced function of one output (see :func:`export_onnx`)."""
    jaxpr = closed.jaxpr
    if len(jaxpr.outvars) != 1:
        raise ValueError(f"ONNX export takes a function of one output, not {len(jaxpr.outvars)}")
    builder = GraphBuilder(_symbolic_dimension(jaxpr.invars, input_names))
    consts = [np.asarray(const) for const in closed.consts]
    (result,) = _translate(builder, jaxpr, consts, list(input_names))
    out_var = jaxpr.outvars[0]
    out_aval = out_var.aval
    if isinstance(result, np.ndarray | Broadcasting) and is_constant(result):
        raise ValueError("ONNX export: the output does not depend on the inputs")
    final = builder.exact(result, out_aval.shape)
    builder.node_named("Identity", [final], output_name)
    graph = helper.make_graph(
        builder.nodes,
        "tlflax_classifier",
        [
            builder.value_info(name, var.aval.dtype, var.aval.shape)
            for name, var in zip(input_names, jaxpr.invars, strict=True)
        ],
        [builder.value_info(output_name, out_aval.dtype, out_aval.shape)],
        initializer=builder.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tlflax"
    )
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model)
    return model


def _symbolic_dimension(invars: Sequence, input_names: Sequence[str]) -> SymbolicDimension | None:
    """The symbolic dimension of the inputs and the first input axis that is exactly it."""
    for var, name in zip(invars, input_names, strict=True):
        for axis, dim in enumerate(var.aval.shape):
            if not is_concrete([dim]):
                symbols = dim._get_vars()  # jax's symbolic dimension expression
                if len(symbols) != 1 or str(dim) not in symbols:
                    raise NotImplementedError(
                        f"ONNX export: input {name!r} dimension {dim} must be one plain symbol"
                    )
                return SymbolicDimension(str(dim), name, axis)
    return None


def _read(env: dict, var) -> Value:
    if isinstance(var, Literal):
        return np.asarray(var.val, dtype=var.aval.dtype)
    return env[var]


def _translate(builder: GraphBuilder, jaxpr: Jaxpr, consts: Sequence, inputs: Sequence[Value]):
    """The output values of ``jaxpr`` given its constants' and inputs' values."""
    env: dict = {}
    for var, const in zip(jaxpr.constvars, consts, strict=True):
        env[var] = np.asarray(const)
    for var, value in zip(jaxpr.invars, inputs, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        values = [_read(env, var) for var in eqn.invars]
        outputs = _translate_equation(builder, eqn, values)
        for var, value in zip(eqn.outvars, outputs, strict=True):
            env[var] = value
    return [_read(env, var) for var in jaxpr.outvars]


def _translate_equation(builder: GraphBuilder, eqn, values: list[Value]) -> list[Value]:
    name = eqn.primitive.name
    if name not in _NEVER_FOLDED and _foldable(eqn, values):
        return _evaluate(eqn, values)
    called = _called_jaxpr(eqn)
    if called is not None:
        if isinstance(called, ClosedJaxpr):
            return _translate(builder, called.jaxpr, called.consts, values)
        return _translate(builder, called, [], values)
    rule = RULES.get(name)
    if rule is None:
        raise UnsupportedPrimitiveError(name)
    if name not in READS_COMPLEX and any(isinstance(value, ComplexPair) for value in values):
        raise UnsupportedPrimitiveError(name, "on complex numbers (only real and imag are)")
    outputs = rule(builder, eqn, values)
    return list(outputs) if eqn.primitive.multiple_results else [outputs]


def _foldable(eqn, values: list[Value]) -> bool:
    return all(is_constant(value) for value in values) and all(
        is_concrete(var.aval.shape) for var in (*eqn.invars, *eqn.outvars)
    )


def _evaluate(eqn, values: list[Value]) -> list[np.ndarray]:
    """The equation's outputs, computed now with JAX (its inputs are all constants)."""
    arrays = [
        constant_value(value, var.aval.shape) for value, var in zip(values, eqn.invars, strict=True)
    ]
    # As jax.core.eval_jaxpr runs an equation (this JAX's get_bind_params returns the params).
    params = eqn.primitive.get_bind_params(eqn.params)
    with jax.default_device(jax.devices("cpu")[0]), eqn.ctx.manager:
        outputs = eqn.primitive.bind(*arrays, **params)
    if not eqn.primitive.multiple_results:
        outputs = [outputs]
    return [np.asarray(output) for output in outputs]


def _called_jaxpr(eqn) -> ClosedJaxpr | Jaxpr | None:
    """The jaxpr a call-like equation runs on its inputs (then inlined), or None."""
    key = _CALLS.get(eqn.primitive.name)
    called = eqn.params.get(key) if key else None
    return called if isinstance(called, ClosedJaxpr | Jaxpr) else None
