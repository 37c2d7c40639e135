"""The Pretrainer: shapes, named parameters, visibility through the attention mask, variants."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from jaxlm.models import MlmHead, ModelConfig, NspHead, Pretrainer

# Weights ten times BERT's (initializer_range 0.2), so that a perturbation that should show in
# the outputs shows clearly above float noise.
CONFIG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                     max_position=32, initializer_range=0.2)
HEADS = (("mlm", MlmHead), ("nsp", NspHead))
B, L, P = 3, 16, 4


def _batch(rng, length=L, pad=0):
  """Regular tokens, [CLS] first and [SEP] last, then `pad` padding positions."""
  ids = rng.integers(5, CONFIG.vocab_size, (B, length)).astype(np.int32)
  ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
  types = np.zeros((B, length), np.int32)
  types[:, length // 2:] = 1
  if pad:
    ids = np.concatenate([ids, np.full((B, pad), PAD_ID, np.int32)], axis=1)
    types = np.concatenate([types, np.zeros((B, pad), np.int32)], axis=1)
  positions = np.stack([rng.choice(np.arange(1, length - 1), P, replace=False) for _ in range(B)])
  return {"input_ids": ids, "token_type_ids": types, "mlm_positions": positions.astype(np.int32)}


def _init(config, batch, seed=0):
  model = Pretrainer(config, heads=HEADS)
  init = jax.jit(lambda rng, b: model.init({"params": rng}, b, deterministic=True))
  return model, init(jax.random.key(seed), batch)


_apply = jax.jit(
    lambda model, variables, batch: model.apply(variables, batch, deterministic=True),
    static_argnums=0,
)


@pytest.fixture(scope="module")
def initialised():
  batch = _batch(np.random.default_rng(0))
  model, boxed = _init(CONFIG, batch)
  return model, boxed, nn.meta.unbox(boxed), batch


def test_output_shapes_and_dtypes(initialised):
  model, _, params, batch = initialised
  out = _apply(model, params, batch)
  assert set(out) == {"mlm", "nsp"}
  assert out["mlm"].shape == (B, P, CONFIG.vocab_size) and out["mlm"].dtype == jnp.float32
  assert out["nsp"].shape == (B, 2) and out["nsp"].dtype == jnp.float32
  assert all(np.isfinite(np.asarray(x)).all() for x in out.values())


def test_heads_are_chosen_by_the_caller(initialised):
  _, _, _, batch = initialised
  model = Pretrainer(CONFIG, heads=(("nsp", NspHead),))
  variables = jax.eval_shape(lambda r: model.init({"params": r}, batch, deterministic=True),
                             jax.random.key(0))
  assert set(variables["params"]) == {"encoder", "nsp"}
  out = jax.eval_shape(lambda v: model.apply(v, batch, deterministic=True),
                       nn.meta.unbox(variables))
  assert set(out) == {"nsp"}


def test_every_parameter_is_named(initialised):
  _, boxed, _, _ = initialised
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) > 20
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim, (name, leaf.names, leaf.value.shape)
    assert all(isinstance(n, str) for n in leaf.names), (name, leaf.names)


def test_parameter_shapes(initialised):
  _, _, params, _ = initialised
  p = params["params"]
  d, h = CONFIG.hidden_size, CONFIG.num_heads
  assert p["encoder"]["embeddings"]["token"]["embedding"].shape == (CONFIG.vocab_size, d)
  assert p["encoder"]["embeddings"]["position"]["embedding"].shape == (CONFIG.max_position, d)
  assert p["encoder"]["layer_1"]["attention"]["query"]["kernel"].shape == (d, h, d // h)
  assert p["encoder"]["layer_1"]["mlp"]["wi"]["kernel"].shape == (d, CONFIG.mlp_dim)
  assert f"layer_{CONFIG.num_layers}" not in p["encoder"]
  assert p["mlm"]["bias"].shape == (CONFIG.vocab_size,)


def test_appended_padding_changes_nothing(initialised):
  model, _, params, batch = initialised
  padded = _batch(np.random.default_rng(0), pad=8)
  np.testing.assert_array_equal(padded["input_ids"][:, :L], batch["input_ids"])
  np.testing.assert_array_equal(padded["mlm_positions"], batch["mlm_positions"])
  out, out_padded = _apply(model, params, batch), _apply(model, params, padded)
  for key in out:
    np.testing.assert_allclose(out_padded[key], out[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_masked_out_keys_are_invisible(initialised):
  """With an explicit attention mask, tokens nobody may attend to do not affect others."""
  model, _, params, batch = initialised
  hidden = np.zeros(L, bool)
  hidden[[3, 7, 8, 12]] = True
  mask = np.broadcast_to(~hidden[None, None, None, :], (B, 1, 1, L))
  visible_positions = np.tile(np.array([[1, 2, 5, 14]], np.int32), (B, 1))
  base = {**batch, "attention_mask": mask, "mlm_positions": visible_positions}
  changed_ids = batch["input_ids"].copy()
  changed_ids[:, hidden] = (changed_ids[:, hidden] + 17) % (CONFIG.vocab_size - 5) + 5
  changed = {**base, "input_ids": changed_ids}
  out, out_changed = _apply(model, params, base), _apply(model, params, changed)
  for key in out:
    np.testing.assert_allclose(out_changed[key], out[key], rtol=1e-5, atol=1e-5, err_msg=key)
  # Without the mask the same change is seen everywhere (so the check above has teeth).
  plain = _apply(model, params, {**batch, "mlm_positions": visible_positions})
  plain_changed = _apply(model, params,
                         {**batch, "input_ids": changed_ids, "mlm_positions": visible_positions})
  for key in plain:
    assert not np.allclose(plain[key], plain_changed[key], atol=1e-4), key


def test_causal_mask_hides_the_future(initialised):
  model, _, params, batch = initialised
  causal = np.tril(np.ones((L, L), bool))[None, None]
  positions = np.tile(np.arange(P, dtype=np.int32)[None] + 2, (B, 1))  # 2..5.
  base = {**batch, "attention_mask": causal, "mlm_positions": positions}
  ids = batch["input_ids"].copy()
  ids[:, 4] = (ids[:, 4] + 1 - 5) % (CONFIG.vocab_size - 5) + 5
  out = _apply(model, params, base)["mlm"]
  out_changed = _apply(model, params, {**base, "input_ids": ids})["mlm"]
  np.testing.assert_allclose(out_changed[:, :2], out[:, :2], rtol=1e-5, atol=1e-5)  # Past.
  assert not np.allclose(out_changed[:, 2:], out[:, 2:], atol=1e-4)  # Position 4 and later.


def test_dropout_acts_only_when_not_deterministic(initialised):
  model, _, params, batch = initialised
  run = jax.jit(lambda rng: model.apply(params, batch, deterministic=False,
                                        rngs={"dropout": rng}))
  a, b = run(jax.random.key(1)), run(jax.random.key(2))
  assert not np.allclose(a["mlm"], b["mlm"])
  np.testing.assert_array_equal(a["mlm"], run(jax.random.key(1))["mlm"])


def test_pre_layer_norm_variant(initialised):
  model, _, params, batch = initialised
  pre_model = Pretrainer(dataclasses.replace(CONFIG, pre_layer_norm=True), heads=HEADS)
  shapes = jax.eval_shape(lambda r: pre_model.init({"params": r}, batch, deterministic=True),
                          jax.random.key(0))
  assert "final_norm" in shapes["params"]["encoder"]
  assert "final_norm" not in params["params"]["encoder"]
  # The same weights plus the final LayerNorm (as initialised) is a complete pre-LN tree.
  d = CONFIG.hidden_size
  pre_params = {"params": {**params["params"], "encoder": {
      **params["params"]["encoder"],
      "final_norm": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}}}}
  assert (jax.tree_util.tree_structure(pre_params)
          == jax.tree_util.tree_structure(nn.meta.unbox(shapes)))
  pre = _apply(pre_model, pre_params, batch)
  post = _apply(model, params, batch)
  assert all(np.isfinite(np.asarray(x)).all() for x in pre.values())
  assert not np.allclose(pre["mlm"], post["mlm"], atol=1e-2)


def test_bfloat16_compute(initialised):
  model, _, params, batch = initialised
  config = dataclasses.replace(CONFIG, dtype=jnp.bfloat16)
  bf16_model = Pretrainer(config, heads=HEADS)
  out = _apply(bf16_model, params, batch)  # Same float32 parameters, bfloat16 compute.
  ref = _apply(model, params, batch)
  for key in out:
    assert out[key].dtype == jnp.float32, key  # Heads return float32 logits.
    assert np.isfinite(np.asarray(out[key])).all(), key
    # Close to float32, but computed in lower precision.
    scale = float(np.abs(ref[key]).max())
    err = float(np.abs(out[key] - ref[key]).max())
    assert 0 < err < 0.1 * scale + 0.05, (key, err, scale)
  # bfloat16 parameters as well.
  both = dataclasses.replace(config, param_dtype=jnp.bfloat16)
  both_model = Pretrainer(both, heads=HEADS)
  shapes = jax.eval_shape(lambda r: both_model.init({"params": r}, batch, deterministic=True),
                          jax.random.key(0))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(shapes))
  both_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  assert all(np.isfinite(np.asarray(x)).all() for x in _apply(both_model, both_params,
                                                               batch).values())


def test_initialisation_follows_bert(initialised):
  """Weights: BERT's truncated normal (TF's: std `initializer_range` before truncation at twice
  that, so about 0.88 x it after); biases 0, LayerNorm scales 1."""
  _, _, params, _ = initialised
  p = params["params"]
  r = CONFIG.initializer_range
  for name, w in (("token embedding", p["encoder"]["embeddings"]["token"]["embedding"]),
                  ("mlp kernel", p["encoder"]["layer_0"]["mlp"]["wi"]["kernel"]),
                  ("query kernel", p["encoder"]["layer_1"]["attention"]["query"]["kernel"])):
    w = np.asarray(w)
    assert abs(w.mean()) < 0.1 * r, name
    assert 0.8 * r < w.std() < 1.05 * r, (name, w.std())
    assert np.abs(w).max() <= 2 * r + 1e-6, (name, np.abs(w).max())
  np.testing.assert_array_equal(p["encoder"]["layer_0"]["mlp"]["wi"]["bias"], 0)
  np.testing.assert_array_equal(p["encoder"]["embeddings"]["layer_norm"]["scale"], 1)
  a = np.asarray(p["encoder"]["layer_0"]["mlp"]["wi"]["kernel"])
  b = np.asarray(p["encoder"]["layer_1"]["mlp"]["wi"]["kernel"])
  assert not np.allclose(a, b)  # Each layer draws its own weights.


def test_mlm_logits_are_tied_to_the_token_embedding(initialised):
  """Changing one row of the token table changes that token's MLM logit."""
  model, _, params, batch = initialised
  token = 77
  assert not (batch["input_ids"] == token).any()
  edited = jax.tree_util.tree_map(lambda x: x, params)
  table = edited["params"]["encoder"]["embeddings"]["token"]["embedding"]
  edited["params"]["encoder"]["embeddings"]["token"]["embedding"] = table.at[token].multiply(3.0)
  out, out_edited = _apply(model, params, batch)["mlm"], _apply(model, edited, batch)["mlm"]
  others = np.delete(np.arange(CONFIG.vocab_size), token)
  np.testing.assert_allclose(out_edited[..., others], out[..., others], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out_edited[..., token], out[..., token], atol=1e-4)
