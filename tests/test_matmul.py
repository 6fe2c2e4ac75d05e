"""Products whose gradients run in turn, and MiniLM's GELU: same values as the plain forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlflax.models.matmul import matmul_in_turn
from tlflax.models.minilm import gelu


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
def test_matmul_in_turn_matches_the_plain_product_and_its_gradients(shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((*shape[:-1], 4)), jnp.float32)

    def loss(product, x, kernel):
        return jnp.sum(jnp.tanh(product(x, kernel)) * weights)

    np.testing.assert_allclose(matmul_in_turn(x, kernel), x @ kernel, rtol=1e-6)
    ours = jax.grad(lambda *a: loss(matmul_in_turn, *a), argnums=(0, 1))(x, kernel)
    plain = jax.grad(lambda *a: loss(jnp.matmul, *a), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, plain, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gelu_matches_the_exact_form_and_its_derivative():
    x = jnp.linspace(-8.0, 8.0, 2001)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
    ours = jax.vmap(jax.grad(gelu))(x)
    exact = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(ours, exact, atol=2e-6)
    # The tanh approximation differs by up to ~5e-4 here: the test tells the two apart.
    assert float(jnp.max(jnp.abs(jax.nn.gelu(x, approximate=True) - gelu(x)))) > 1e-4
