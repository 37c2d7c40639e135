"""`model.attention_impl`: jax.nn.dot_product_attention ("xla") against jaxlm's own einsums, for
every kind of mask jaxlm builds (rows that see no key included) and every position encoding; the
option through a whole Pretrainer; the combinations refused, and when."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models
from jaxlm.errors import UserError
from jaxlm.models import ModelConfig, Pretrainer
from jaxlm.models.attention import (MultiHeadAttention, causal_mask, padding_mask,
                                    two_stream_masks)
from jaxlm.models.heads import LmHead, MlmHead, NspHead, PlmHead

# Large weights, so that a wrong mask or scale shows far above float noise. No dropout: "xla" has
# none on attention probabilities.
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                     max_position=16, initializer_range=0.2, dropout_rate=0.0,
                     attention_dropout_rate=0.0)
B, L = 2, 10
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _ids():
  ids = np.random.default_rng(0).integers(5, CONFIG.vocab_size, (B, L)).astype(np.int32)
  ids[1, -3:] = 0  # Row 1 ends in padding.
  return jnp.asarray(ids)


def _masks():
  """name -> (query length, `[B|1, 1, Q, K]` mask, positions or None)."""
  ids = _ids()
  content_LL, query_PL = two_stream_masks(L, 4)
  # Every token a target: the first in the order sees no key at all (an all-False row).
  _, alone_LL = two_stream_masks(L, L)
  padding = padding_mask(ids)
  positions_BL = jnp.asarray(np.stack([np.random.default_rng(r).permutation(L) for r in range(B)]))
  return {
      "padding": (L, padding, None),
      "causal": (L, causal_mask(ids), None),
      "two_stream_content": (L, content_LL & padding, (positions_BL, positions_BL)),
      "two_stream_query": (4, query_PL & padding, (positions_BL[:, L - 4:], positions_BL)),
      "nothing_visible_rows": (L, alone_LL & padding, (positions_BL, positions_BL)),
  }


def _outputs_and_grads(config, q_length, mask, positions):
  """The attention output and its gradients (parameters and both inputs) for `config`."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(B, q_length, CONFIG.hidden_size)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(B, L, CONFIG.hidden_size)), jnp.float32)
  einsum_module = MultiHeadAttention(dataclasses.replace(config, attention_impl="einsum"))
  params = nn.meta.unbox(einsum_module.init(jax.random.key(0), q, kv, mask, True, positions))
  # Non-zero biases everywhere (relative attention's u and v start at zero).
  params = jax.tree_util.tree_map(lambda x: x + 0.1, params)
  weights = jnp.asarray(rng.normal(size=(B, q_length, CONFIG.hidden_size)), jnp.float32)

  def loss(params, q, kv):
    out = MultiHeadAttention(config).apply(params, q, kv, mask, True, positions)
    return jnp.sum(out * weights), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      params, q, kv)
  return out, grads


@pytest.mark.parametrize("encoding", ["absolute", "rope", "relative"])
@pytest.mark.parametrize("mask_name", list(_masks()))
def test_xla_matches_einsum_outputs_and_gradients(encoding, mask_name):
  q_length, mask, positions = _masks()[mask_name]
  config = dataclasses.replace(CONFIG, position_encoding=encoding)
  want_out, want_grads = _outputs_and_grads(config, q_length, mask, positions)
  got_out, got_grads = _outputs_and_grads(dataclasses.replace(config, attention_impl="xla"),
                                          q_length, mask, positions)
  np.testing.assert_allclose(got_out, want_out, **TOLERANCE)
  for got, want in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
    np.testing.assert_allclose(got, want, **TOLERANCE)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(got_grads))


def test_a_row_with_no_visible_key_gives_only_the_output_bias():
  q_length, mask, positions = _masks()["nothing_visible_rows"]
  assert not np.asarray(mask)[0, 0, 0].any()  # Row 0 of example 0 sees nothing.
  out, _ = _outputs_and_grads(dataclasses.replace(CONFIG, attention_impl="xla"), q_length, mask,
                              positions)
  np.testing.assert_allclose(out[0, 0], np.full(CONFIG.hidden_size, 0.1), rtol=1e-6)


def _pretrainer(config):
  return Pretrainer(config, heads=(("mlm", MlmHead), ("nsp", NspHead), ("clm", LmHead),
                                   ("plm", PlmHead)),
                    views=(("clm", "causal"), ("plm", "permuted")))


def _pretrainer_batch():
  ids = np.asarray(_ids())
  perms = np.stack([np.random.default_rng(r).permutation(L) for r in range(B)]).astype(np.int32)
  return {"input_ids": ids, "token_type_ids": np.zeros_like(ids),
          "mlm_positions": np.full((B, 2), 3, np.int32), "plm_perm": perms,
          "plm_target_weights": np.ones((B, 2), np.float32)}


@pytest.mark.parametrize("encoding", ["absolute", "relative"])
def test_option_round_trips_through_a_whole_pretrainer(encoding):
  """`config.model.attention_impl=xla` from the config file to every head's output, equal to
  the einsum path's: MLM and NSP (padding mask), CLM (causal), PLM (two streams). (Gradients
  are compared module by module above.)"""
  piece = models.bert("tiny", vocab_size=CONFIG.vocab_size)
  piece.update(max_position=16, attention_dropout_rate=0.0, position_encoding=encoding,
               initializer_range=0.2, num_layers=1)  # One layer: the compile dominates.
  piece.attention_impl = "xla"
  config = ModelConfig.from_config(piece)
  assert config.attention_impl == "xla"
  batch = _pretrainer_batch()
  einsum_model = _pretrainer(dataclasses.replace(config, attention_impl="einsum"))
  params = nn.meta.unbox(jax.jit(lambda r: einsum_model.init({"params": r}, batch,
                                                           deterministic=True))(jax.random.key(0)))

  want = jax.jit(lambda p: einsum_model.apply(p, batch, deterministic=True))(params)
  got = jax.jit(lambda p: _pretrainer(config).apply(p, batch, deterministic=True))(params)
  assert set(got) == {"mlm", "nsp", "clm", "plm"}
  for name in got:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_xla_trains_with_hidden_dropout():
  """Hidden dropout stays on with "xla" (only attention-probability dropout is refused)."""
  config = dataclasses.replace(CONFIG, attention_impl="xla", dropout_rate=0.1, num_layers=1)
  batch = _pretrainer_batch()
  model = Pretrainer(config, heads=(("mlm", MlmHead),))
  params = nn.meta.unbox(jax.jit(lambda r: model.init({"params": r}, batch, deterministic=True))(
      jax.random.key(0)))
  apply = jax.jit(lambda key: model.apply(params, batch, deterministic=False,
                                          rngs={"dropout": key}))
  outs = [apply(jax.random.key(k)) for k in (1, 2)]
  assert np.isfinite(np.asarray(outs[0]["mlm"])).all()
  assert np.abs(np.asarray(outs[0]["mlm"]) - np.asarray(outs[1]["mlm"])).max() > 1e-4


@pytest.mark.parametrize("changes, words", [
    ({"attention_impl": "xla"}, ["no dropout", "attention_dropout_rate=0"]),  # Default rate 0.1.
    ({"attention_impl": "flash"}, ["model.attention_impl is 'flash'", "einsum"]),
    ({"attention_impl": "cudnn", "attention_dropout_rate": 0.0},
     ["bfloat16 or float16", "dtype=bfloat16"]),
    ({"attention_impl": "cudnn", "attention_dropout_rate": 0.0, "dtype": "bfloat16",
      "hidden_size": 48, "num_heads": 4}, ["multiple of 8, not 12"]),
    ({"attention_impl": "cudnn", "attention_dropout_rate": 0.0, "dtype": "bfloat16",
      "position_encoding": "relative"}, ["'relative'", "attention_impl=xla"]),
])
def test_bad_combinations_are_refused_at_config_load(changes, words):
  piece = models.bert("tiny")
  piece.update(changes)
  with pytest.raises(UserError) as raised:
    ModelConfig.from_config(piece)
  for word in words:
    assert word in str(raised.value)


def test_cudnn_off_a_gpu_is_refused_when_traced():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present: cudnn may run here")
  config = dataclasses.replace(CONFIG, attention_impl="cudnn", dtype=jnp.bfloat16,
                               hidden_size=32, num_heads=4)
  x = jnp.zeros((1, 4, 32), jnp.bfloat16)
  mask = jnp.ones((1, 1, 4, 4), bool)
  with pytest.raises(UserError, match="'cudnn'.*runs on 'cpu'.*attention_impl=xla"):
    MultiHeadAttention(config).init(jax.random.key(0), x, x, mask, True)


def test_attention_dropout_set_after_load_is_refused_when_training():
  """Fine-tuning replaces the dropout rates after config load: the step refuses, eval runs."""
  config = dataclasses.replace(CONFIG, attention_impl="xla", attention_dropout_rate=0.1)
  x = jnp.ones((1, 4, 32), jnp.float32)
  mask = jnp.ones((1, 1, 4, 4), bool)
  module = MultiHeadAttention(config)
  params = module.init(jax.random.key(0), x, x, mask, True)  # Deterministic: no dropout.
  with pytest.raises(UserError, match="attention_dropout_rate is 0.1"):
    module.apply(params, x, x, mask, False, rngs={"dropout": jax.random.key(1)})
