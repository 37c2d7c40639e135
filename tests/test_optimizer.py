"""The optax chain: weight-decay mask, decoupled decay, learning-rate schedules."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import optimizers
from jaxlm.errors import UserError
from jaxlm.models import MlmHead, ModelConfig, NspHead, Pretrainer
from jaxlm.training import optimizer

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                     max_position=32)


@pytest.fixture(scope="module")
def boxed_params():
  """A real Pretrainer parameter tree with its nn.Partitioned boxes (shapes only)."""
  model = Pretrainer(CONFIG, heads=(("mlm", MlmHead), ("nsp", NspHead)))
  batch = {"input_ids": jnp.zeros((1, 8), jnp.int32),
           "token_type_ids": jnp.zeros((1, 8), jnp.int32),
           "mlm_positions": jnp.zeros((1, 2), jnp.int32)}
  return jax.eval_shape(lambda r: model.init({"params": r}, batch, deterministic=True),
                        jax.random.key(0))["params"]


def _random_params(boxed):
  """Concrete values for every parameter, all non-zero (so an unchanged bias means no decay)."""
  leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(boxed))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_unflatten(
      tree, [jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype) for x in leaves])


def _by_name(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _decayed_by_rule(name):
  """What BERT decays: weight matrices and embedding tables, not biases or LayerNorm."""
  last = name.rsplit("['", 1)[1].rstrip("']")
  return last in ("kernel", "embedding")


def test_decay_mask_on_plain_parameters(boxed_params):
  mask = _by_name(optimizer.decay_mask(nn.meta.unbox(boxed_params)))
  assert len(mask) > 20
  for name, decayed in mask.items():
    assert decayed is _decayed_by_rule(name), name
  assert mask["['encoder']['layer_0']['mlp']['wi']['kernel']"] is True
  assert mask["['encoder']['embeddings']['token']['embedding']"] is True
  assert mask["['encoder']['layer_0']['attention']['query']['bias']"] is False
  assert mask["['encoder']['layer_0']['mlp_norm']['scale']"] is False
  assert mask["['encoder']['embeddings']['layer_norm']['bias']"] is False
  assert mask["['mlm']['bias']"] is False
  assert mask["['mlm']['layer_norm']['scale']"] is False


def test_decay_mask_on_boxed_parameters(boxed_params):
  mask = optimizer.decay_mask(boxed_params)
  boxes = jax.tree_util.tree_leaves(mask, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxes and all(isinstance(b, nn.Partitioned) for b in boxes)
  plain = optimizer.decay_mask(nn.meta.unbox(boxed_params))
  assert _by_name(nn.meta.unbox(mask)) == _by_name(plain)


def test_adamw_with_zero_gradient_decays_only_weights(boxed_params):
  config = optimizers.adamw_bert(learning_rate=0.1, warmup_steps=0)
  tx, schedule = optimizer.make_optimizer(config, total_steps=100)
  params = _random_params(boxed_params)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  shrink = 1 - float(schedule(0)) * config.weight_decay
  assert shrink < 0.999
  old_by_name, new_by_name = _by_name(params), _by_name(new)
  for name, old in old_by_name.items():
    if _decayed_by_rule(name):
      np.testing.assert_allclose(new_by_name[name], old * shrink, rtol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(new_by_name[name], old, err_msg=name)


def _two_steps(tx, params, first, second):
  """The update of the second step, after a first step with gradient `first`."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(first, state, params)
  return update(second, state, params)[0]


def test_gradients_are_clipped_to_the_global_norm():
  config = optimizers.adamw_bert(learning_rate=0.1, warmup_steps=0)
  rng = np.random.default_rng(1)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(32, 16)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}}
  big = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 50.0), params)
  small = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 1e-3), params)
  clipped, _ = optax.clip_by_global_norm(config.clip_norm).update(big, None)
  assert float(optax.tree.norm(big)) > 100 * config.clip_norm
  tx, _ = optimizer.make_optimizer(config, total_steps=100)
  config.clip_norm = 0.0  # Disabled.
  tx_unclipped, _ = optimizer.make_optimizer(config, total_steps=100)
  with_clip = _two_steps(tx, params, big, small)
  # Clipping in the chain is the same as clipping the gradient before an unclipped chain ...
  for a, b in zip(jax.tree_util.tree_leaves(with_clip),
                  jax.tree_util.tree_leaves(_two_steps(tx_unclipped, params, clipped, small))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  # ... and not the same as no clipping (Adam's second moment remembers the large gradient).
  without = _two_steps(tx_unclipped, params, big, small)
  kernel = lambda tree: tree["dense"]["kernel"]
  assert not np.allclose(kernel(with_clip), kernel(without), rtol=1e-2)


def _schedule(total=100, **overrides):
  config = optimizers.adamw_bert(learning_rate=1e-3, warmup_steps=10)
  config.update(overrides)
  return optimizer.make_schedule(config, total), config


def test_linear_warmup_then_linear_decay():
  schedule, config = _schedule(end_learning_rate_ratio=0.1)
  peak, end = config.learning_rate, config.learning_rate * 0.1
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(peak / 2, rel=1e-5)
  assert float(schedule(10)) == pytest.approx(peak, rel=1e-5)
  assert float(schedule(55)) == pytest.approx((peak + end) / 2, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(end, rel=1e-5)
  assert float(schedule(99)) > float(schedule(100))
  values = np.array([float(schedule(s)) for s in range(101)])
  assert (np.diff(values[:11]) > 0).all() and (np.diff(values[10:]) < 0).all()


def test_cosine_decay():
  schedule, config = _schedule(decay="cosine", end_learning_rate_ratio=0.1)
  peak, end = config.learning_rate, config.learning_rate * 0.1
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(peak, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(end, rel=1e-5)
  for step in (25, 55, 80):
    t = (step - 10) / 90
    want = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))
    assert float(schedule(step)) == pytest.approx(want, rel=1e-4), step


def test_constant_after_warmup():
  schedule, config = _schedule(decay="constant")
  assert float(schedule(3)) == pytest.approx(0.3 * config.learning_rate, rel=1e-5)
  for step in (10, 50, 100):
    assert float(schedule(step)) == pytest.approx(config.learning_rate, rel=1e-6)


def test_trapezoid_holds_the_peak_then_cools_down_linearly():
  schedule, config = _schedule(decay="trapezoid", cooldown_fraction=0.3)
  peak = config.learning_rate
  assert float(schedule(5)) == pytest.approx(peak / 2, rel=1e-5)  # Warm-up as before.
  for step in (10, 40, 70):  # Constant until 30 steps before the end.
    assert float(schedule(step)) == pytest.approx(peak, rel=1e-6), step
  assert float(schedule(85)) == pytest.approx(peak / 2, rel=1e-5)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
  values = np.array([float(schedule(s)) for s in range(70, 101)])
  assert (np.diff(values) < 0).all()


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_trapezoid_needs_a_cooldown_fraction_in_0_1(fraction):
  with pytest.raises(UserError, match="cooldown_fraction"):
    _schedule(decay="trapezoid", cooldown_fraction=fraction)


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant", "trapezoid"])
def test_no_warmup_starts_at_the_peak(decay):
  schedule, config = _schedule(decay=decay, warmup_steps=0)
  assert float(schedule(0)) == pytest.approx(config.learning_rate, rel=1e-6)
  if decay != "constant":
    assert float(schedule(99)) < config.learning_rate
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_unknown_decay_is_a_user_error():
  with pytest.raises(UserError, match="exponential"):
    _schedule(decay="exponential")
