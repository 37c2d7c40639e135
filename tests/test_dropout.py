"""jaxlm's dropout (two 16-bit draws per PRNG word) and its erf-form exact GELU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import dropout


@pytest.mark.parametrize("rate", [0.1, 0.45, 0.9])
def test_drops_the_rate_and_keeps_the_mean(rate):
  x = jnp.ones((64, 4, 63, 65))  # Odd last axis: one word's second draw is cut off.
  y = dropout.Dropout(rate).apply({}, x, deterministic=False,
                                   rngs={"dropout": jax.random.key(0)})
  dropped = float(jnp.mean(y == 0))
  n = x.size
  assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n), dropped
  assert float(jnp.mean(y)) == pytest.approx(1.0, abs=5 * np.sqrt(rate / (1 - rate) / n))
  values = np.unique(np.asarray(y))  # Zero, and the kept scale (rate rounded to 1/65536).
  assert values[0] == 0.0 and len(values) == 2
  assert values[1] == pytest.approx(1 / (1 - rate), rel=1e-4)


def test_draws_are_independent_along_the_split_axis():
  """Low and high halves of a word land in the two halves of the last axis: they must not be
  correlated (a mask built from the same bits twice would be)."""
  keep = dropout.keep_mask(jax.random.key(1), (4096, 64), 0.5)
  low, high = np.asarray(keep[:, :32], float), np.asarray(keep[:, 32:], float)
  correlation = np.corrcoef(low.ravel(), high.ravel())[0, 1]
  assert abs(correlation) < 0.01, correlation
  # Different keys, different masks; the same key, the same mask.
  assert not np.array_equal(keep, dropout.keep_mask(jax.random.key(2), (4096, 64), 0.5))
  np.testing.assert_array_equal(keep, dropout.keep_mask(jax.random.key(1), (4096, 64), 0.5))


def test_deterministic_and_zero_rate_pass_through_and_rate_one_drops_all():
  x = jax.random.normal(jax.random.key(0), (3, 5))
  rngs = {"dropout": jax.random.key(0)}
  np.testing.assert_array_equal(dropout.Dropout(0.3).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(dropout.Dropout(0.0).apply({}, x, False, rngs=rngs), x)
  np.testing.assert_array_equal(dropout.Dropout(1.0).apply({}, x, False, rngs=rngs), 0 * x)


def test_gelu_is_the_exact_gelu():
  x = jnp.linspace(-12.0, 12.0, 20001)
  np.testing.assert_allclose(dropout.gelu(x), nn.gelu(x, approximate=False), atol=1e-6)
  grad = jax.vmap(jax.grad(dropout.gelu))(x)
  want = jax.vmap(jax.grad(lambda v: nn.gelu(v, approximate=False)))(x)
  np.testing.assert_allclose(grad, want, atol=1e-6)
