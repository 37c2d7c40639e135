"""Rematerialisation and scan over layers: same numbers, less memory or less compile time."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import UserError
from jaxlm.models import MlmHead, ModelConfig, NspHead, Pretrainer

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=2, mlp_dim=64,
                     max_position=16, dropout_rate=0.1, attention_dropout_rate=0.1)


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 64, (2, 16)).astype(np.int32)
  ids[:, 12:] = 0
  return dict(input_ids=jnp.asarray(ids), token_type_ids=jnp.zeros((2, 16), jnp.int32),
              mlm_positions=jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32),
              next_sentence_label=jnp.zeros((2,), jnp.int32))


def _loss_and_grads(config, params=None):
  model = Pretrainer(config, heads=(("mlm", MlmHead), ("nsp", NspHead)))
  batch = _batch()
  if params is None:
    params = nn.meta.unbox(model.init(jax.random.key(0), batch, deterministic=True))["params"]

  def loss(p):
    out = model.apply({"params": p}, batch, deterministic=False,
                      rngs={"dropout": jax.random.key(1)})
    return out["mlm"].sum() + out["nsp"].sum()

  return params, *jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_changes_nothing_but_memory(policy):
  params, loss, grads = _loss_and_grads(CONFIG)
  _, loss_remat, grads_remat = _loss_and_grads(
      dataclasses.replace(CONFIG, remat_policy=policy), params)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads_remat), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scanned_layers_stack_parameters_on_a_named_layer_axis():
  config = dataclasses.replace(CONFIG, scan_layers=True)
  model = Pretrainer(config, heads=(("mlm", MlmHead),))
  boxed = model.init(jax.random.key(0), _batch(), deterministic=True)["params"]
  kernel = boxed["encoder"]["layers"]["layer"]["mlp"]["wi"]["kernel"]
  assert kernel.value.shape == (3, 32, 64)
  assert kernel.names == ("layers", "embed", "mlp")


def test_scanned_layers_compute_what_a_loop_of_the_same_weights_computes():
  """Copying each scanned layer's slice into a looped model gives the same outputs."""
  scanned = dataclasses.replace(CONFIG, scan_layers=True, dropout_rate=0.0,
                                attention_dropout_rate=0.0)
  looped = dataclasses.replace(scanned, scan_layers=False)
  batch = _batch()
  heads = (("mlm", MlmHead),)
  p_scan = nn.meta.unbox(Pretrainer(scanned, heads).init(jax.random.key(0), batch,
                                                        deterministic=True))["params"]
  p_loop = jax.tree_util.tree_map(lambda x: x, p_scan)
  stacked = p_loop["encoder"].pop("layers")["layer"]
  for i in range(3):
    p_loop["encoder"][f"layer_{i}"] = jax.tree_util.tree_map(lambda x: x[i], stacked)
  out_scan = Pretrainer(scanned, heads).apply({"params": p_scan}, batch, deterministic=True)
  out_loop = Pretrainer(looped, heads).apply({"params": p_loop}, batch, deterministic=True)
  np.testing.assert_allclose(out_scan["mlm"], out_loop["mlm"], rtol=1e-5, atol=1e-5)


def test_scan_keeps_the_compiled_program_flat_in_depth():
  """The program XLA compiles for a scanned model does not grow with depth; a loop's does.

  (Compile time follows program size; the size is measured instead of the time, which is noisy.)
  """

  def program_size(config):
    model = Pretrainer(config, heads=(("mlm", MlmHead),))
    batch = _batch()
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, deterministic=True))

    def loss(p):
      return model.apply(p, batch, deterministic=True)["mlm"].sum()

    return len(jax.jit(jax.grad(loss)).lower(params).as_text())

  scan_2, scan_12 = (program_size(dataclasses.replace(CONFIG, num_layers=n, scan_layers=True))
                     for n in (2, 12))
  loop_2, loop_12 = (program_size(dataclasses.replace(CONFIG, num_layers=n)) for n in (2, 12))
  assert scan_12 < 1.1 * scan_2
  assert loop_12 > 3 * loop_2


def test_unknown_remat_policy_is_a_user_error():
  import ml_collections

  from configs import models

  config = models.bert("tiny")
  config.remat_policy = "sometimes"
  with pytest.raises(UserError, match="remat_policy"):
    ModelConfig.from_config(ml_collections.ConfigDict(config))
