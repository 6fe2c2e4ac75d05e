"""The step profiler's reading of optimised HLO: which op each compiled kernel comes from."""

import jax
import jax.numpy as jnp

from benchmarks.profile_step import hlo_ops


def test_matrix_products_get_their_flops_and_pass():
    batch, width, outputs = 64, 32, 16
    gradient = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))))
    weights, inputs = jnp.ones((width, outputs)), jnp.ones((batch, width))
    ops = hlo_ops(gradient.lower(weights, inputs).compile().as_text())
    products = {op["shape"]: op for op in ops.values() if op["flops"]}
    # Forward x @ w and backward x^T @ g each cost 2 * batch * width * outputs.
    assert products[f"f32[{batch},{outputs}]"]["flops"] == 2 * batch * width * outputs
    assert products[f"f32[{width},{outputs}]"]["flops"] == 2 * batch * width * outputs
    assert products[f"f32[{batch},{outputs}]"]["source"].startswith("jvp()")
    assert products[f"f32[{width},{outputs}]"]["source"].startswith("transpose(jvp())")
    # Elementwise kernels (tanh and its derivative) are there, without FLOPs of products.
    assert any("tanh" in op["source"] and not op["flops"] for op in ops.values())
