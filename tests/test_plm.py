"""Permuted LM (XLNet): two-stream visibility by perturbation and by gradients, for every
position of small random examples, with absolute and relative positions; the constant-mask
(permuted) layout against per-example masks in the original order; rows with nothing to see."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.data.tokenizer import PAD_ID
from jaxlm.models import ModelConfig
from jaxlm.models.attention import MultiHeadAttention, relative_shift
from jaxlm.models.encoder import Encoder, QueryStream
from jaxlm.models.pretrainer import permuted_inputs

# Large initial weights, so that any dependence shows clearly above float noise.
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                     max_position=16, initializer_range=0.2, dropout_rate=0.0,
                     attention_dropout_rate=0.0)
B, L, P = 2, 12, 4
ENCODINGS = ("absolute", "relative")


def _example():
  """Two rows of distinct tokens; row 1 ends in 3 pads, one of them a filler target slot."""
  rng = np.random.default_rng(0)
  ids = np.stack([rng.permutation(np.arange(5, CONFIG.vocab_size))[:L] for _ in range(B)])
  ids[1, -3:] = PAD_ID
  perms = []
  for row in range(B):
    valid = np.flatnonzero(ids[row] != PAD_ID)
    pads = np.flatnonzero(ids[row] == PAD_ID)
    fillers = pads[:1] if row == 1 else pads[:0]
    targets = rng.permutation(valid)[:P - len(fillers)]  # In factorisation order.
    rest = np.setdiff1d(np.arange(L), np.concatenate([targets, fillers]))
    perms.append(np.concatenate([rest, fillers, targets]))
  weights = np.ones((B, P), np.float32)
  weights[1, 0] = 0.0
  return {"input_ids": ids.astype(np.int32), "token_type_ids": np.zeros((B, L), np.int32),
          "plm_perm": np.stack(perms).astype(np.int32), "plm_target_weights": weights}


def _rank(batch):
  """Each original position's place in the factorisation order: -1 for non-targets."""
  rank = np.full((B, L), -1)
  for row in range(B):
    rank[row, batch["plm_perm"][row, L - P:]] = np.arange(P)
  return rank


def _model(encoding, scan=False):
  config = dataclasses.replace(CONFIG, position_encoding=encoding, scan_layers=scan)
  encoder = Encoder(config)
  batch = _example()
  params = nn.meta.unbox(encoder.init(jax.random.key(0), **permuted_inputs(batch),
                                      deterministic=True))
  return encoder, params, batch


def _streams(encoder, params, batch):
  """(content stream in original order [B, L, D], query stream [B, P, D]) of the permuted view."""
  out = _apply(encoder, params, batch)
  inverse = np.argsort(batch["plm_perm"], axis=1)
  content = np.take_along_axis(np.asarray(out.sequence_BLD), inverse[..., None], axis=1)
  return content, np.asarray(out.query_BPD)


_COMPILED = {}


def _apply(encoder, params, batch):
  """The encoder's permuted view, compiled once per encoder."""
  if encoder not in _COMPILED:
    _COMPILED[encoder] = jax.jit(lambda p, b: encoder.apply(p, **permuted_inputs(b),
                                                            deterministic=True))
  return _COMPILED[encoder](params, batch)


def _expected_visibility(batch):
  """[B, L(query position), L(key position)] content, [B, P, L] query: XLNet's rules."""
  rank = _rank(batch)
  valid = batch["input_ids"] != PAD_ID
  content = (rank[:, None, :] <= np.maximum(rank[:, :, None], -1)) & valid[:, None, :]
  query = (rank[:, None, :] < np.arange(P)[None, :, None]) & valid[:, None, :]
  # A non-target never sees a target; a target sees itself in content, never in query.
  content &= ~((rank[:, :, None] == -1) & (rank[:, None, :] >= 0))
  return content, query


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_visibility_by_perturbation(encoding):
  """Changing the token at position j changes exactly the outputs allowed to see it."""
  encoder, params, batch = _model(encoding)
  base_content, base_query = _streams(encoder, params, batch)
  content_sees, query_sees = _expected_visibility(batch)
  for j in range(L):
    changed = dict(batch, input_ids=batch["input_ids"].copy())
    for row in range(B):
      if changed["input_ids"][row, j] != PAD_ID:
        changed["input_ids"][row, j] = 5 + (changed["input_ids"][row, j] - 5 + 29) % 59
    content, query = _streams(encoder, params, changed)
    content_moved = np.abs(content - base_content).max(axis=2)  # [B, L]
    query_moved = np.abs(query - base_query).max(axis=2)  # [B, P]
    for row in range(B):
      if batch["input_ids"][row, j] == PAD_ID:
        continue
      real = batch["input_ids"][row] != PAD_ID
      np.testing.assert_array_equal(content_moved[row][real & ~content_sees[row, :, j]], 0.0)
      assert (content_moved[row][content_sees[row, :, j]] > 1e-4).all(), (row, j)
      np.testing.assert_array_equal(query_moved[row][~query_sees[row, :, j]], 0.0)
      assert (query_moved[row][query_sees[row, :, j] & (batch["plm_target_weights"][row] > 0)]
              > 1e-4).all(), (row, j)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_visibility_by_gradients(encoding):
  """Every token is distinct, so the gradient of an output with respect to the token table's
  rows shows which positions' tokens it read: exactly the visible ones, never its own (query)."""
  encoder, params, batch = _model(encoding)
  content_sees, query_sees = _expected_visibility(batch)
  inverse = np.argsort(batch["plm_perm"], axis=1)
  # A random read-out: a plain sum of a LayerNorm's output hardly depends on its input.
  readout_D = jnp.asarray(np.random.default_rng(2).normal(size=CONFIG.hidden_size), jnp.float32)

  def outputs(table):
    p = {"params": {**params["params"], "embeddings": {**params["params"]["embeddings"],
                                                        "token": {"embedding": table}}}}
    out = encoder.apply(p, **permuted_inputs(batch), deterministic=True)
    content = jnp.take_along_axis(out.sequence_BLD, jnp.asarray(inverse)[..., None], axis=1)
    return content @ readout_D, out.query_BPD @ readout_D  # [B, L], [B, P]

  jacobians = jax.jit(jax.jacrev(outputs))(params["params"]["embeddings"]["token"]["embedding"])
  for stream, jacobian, sees in (("content", jacobians[0], content_sees),
                                 ("query", jacobians[1], query_sees)):
    read = np.abs(np.asarray(jacobian)).sum(axis=-1)  # [B, outputs, V]
    for row in range(B):
      ids = batch["input_ids"][row]
      real = ids != PAD_ID
      for index in range(read.shape[1]):
        if stream == "content" and not real[index]:
          continue
        np.testing.assert_array_equal(read[row, index][ids][real] > 0, sees[row, index][real],
                                      err_msg=f"{stream} {row} {index}")


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_permuted_layout_equals_per_example_masks_in_original_order(encoding):
  """The constant masks over the reordered sequence compute exactly what dense `[B, L, L]` masks
  over the original order compute (for relative attention: the gather against the shift)."""
  encoder, params, batch = _model(encoding)
  content, query = _streams(encoder, params, batch)
  content_sees, query_sees = _expected_visibility(batch)
  perm = batch["plm_perm"]
  dense = encoder.apply(
      params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"]),
      deterministic=True, mask_BHQK=jnp.asarray(content_sees)[:, None],
      query=QueryStream(mask_BHPK=jnp.asarray(query_sees)[:, None],
                        positions_BP=jnp.asarray(perm[:, L - P:]),
                        token_type_ids_BP=jnp.zeros((B, P), jnp.int32)))
  real = batch["input_ids"] != PAD_ID
  np.testing.assert_allclose(np.asarray(dense.sequence_BLD)[real], content[real], atol=2e-5)
  np.testing.assert_allclose(np.asarray(dense.query_BPD), query, atol=2e-5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_scanned_layers_compute_the_same_streams(encoding):
  encoder, params, batch = _model(encoding)
  scanned, scanned_params = _model(encoding, scan=True)[:2]
  layers = [params["params"][f"layer_{i}"] for i in range(CONFIG.num_layers)]
  stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *layers)
  moved = {k: v for k, v in params["params"].items() if not k.startswith("layer_")}
  moved["layers"] = {"layer": stacked}
  assert jax.tree_util.tree_structure(moved) == jax.tree_util.tree_structure(
      scanned_params["params"])
  for a, b in zip(_streams(encoder, params, batch), _streams(scanned, {"params": moved}, batch)):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_relative_shift_matches_the_gather():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 10)))
  shifted = np.asarray(relative_shift(x))
  i, j = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
  np.testing.assert_array_equal(shifted, np.asarray(x)[..., i, 5 - i + j])


def test_query_stream_never_reads_its_own_token_even_alone():
  """A target that sees nothing (every other token padding) gets a finite output that does not
  depend on the content stream at all, and finite gradients."""
  config = dataclasses.replace(CONFIG, num_layers=1)
  attention = MultiHeadAttention(config)
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 3, 32)), jnp.float32)
  kv = jnp.asarray(rng.normal(size=(1, 4, 32)), jnp.float32)
  mask = jnp.asarray([[True, False, False, False], [False] * 4, [True] * 4])[None, None]
  params = attention.init(jax.random.key(0), q, kv, mask, True)
  params = jax.tree_util.tree_map(lambda x: x + 0.3, params)  # A non-zero output bias.
  out = attention.apply(params, q, kv, mask, True)
  bias = nn.meta.unbox(params)["params"]["out"]["bias"]
  np.testing.assert_allclose(out[0, 1], bias, rtol=1e-6)  # Zero attention, then the bias.
  other = attention.apply(params, q, kv * 3.0 + 1.0, mask, True)
  np.testing.assert_array_equal(other[0, 1], out[0, 1])
  grads = jax.grad(lambda kv: attention.apply(params, q, kv, mask, True).sum())(kv)
  assert np.isfinite(np.asarray(grads)).all()
