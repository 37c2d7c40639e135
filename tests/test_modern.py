"""The modern encoder options (issue 13): rotary positions, gated MLPs, no biases, RMSNorm, an
untied output embedding and the MLM head transform off. Each against its definition; every option
at once on a data x fsdp x tensor mesh (the same loss as one device) and through a checkpoint.

The defaults are BERT's and keep its parameters: tests/test_models.py and tests/test_hf.py cover
them.
"""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import special

from configs import models, optimizers
from jaxlm.data.tokenizer import PAD_ID
from jaxlm.errors import UserError
from jaxlm.hf import convert
from jaxlm.models import ModelConfig, Pretrainer, init
from jaxlm.models.attention import MultiHeadAttention, rotary, two_stream_masks
from jaxlm.models.encoder import Encoder, QueryStream
from jaxlm.models.heads import LmHead, MlmHead, NspHead, PlmHead
from jaxlm.models.layers import Mlp, TransformerLayer
from jaxlm.models.pretrainer import permuted_inputs
from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib
from jaxlm.training import checkpoints, flops, optimizer, state as state_lib

# Large initial weights, so that any dependence shows clearly above float noise.
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                     max_position=16, initializer_range=0.2, dropout_rate=0.0,
                     attention_dropout_rate=0.0)
ROPE = dataclasses.replace(CONFIG, position_encoding="rope")
# Every option away from BERT's at once.
MODERN = dict(position_encoding="rope", rope_theta=500.0, mlp_activation="geglu", use_bias=False,
              norm="rms_norm", tie_output_embedding=False, mlm_head_transform=False,
              pre_layer_norm=True)
# Every option on, ModernBERT's layout (no token types, no norm before layer 0's attention) too.
ALL_ON = dataclasses.replace(CONFIG, **MODERN, type_vocab_size=0, first_layer_attention_norm=False)
HEADS = (("mlm", MlmHead), ("nsp", NspHead), ("clm", LmHead), ("plm", PlmHead))
VIEWS = (("clm", "causal"), ("plm", "permuted"))
B, L, P = 4, 12, 4


def _normal(*shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _batch(rows=B):
  """Rows of random tokens (the last ending in 2 pads), MLM positions and a PLM order."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, CONFIG.vocab_size, (rows, L)).astype(np.int32)
  ids[-1, -2:] = PAD_ID
  perm = np.stack([rng.permutation(L) for _ in range(rows)]).astype(np.int32)
  return {"input_ids": ids, "token_type_ids": np.zeros((rows, L), np.int32),
          "next_sentence_label": (np.arange(rows) % 2).astype(np.int32),
          "mlm_positions": np.tile(np.arange(1, 4, dtype=np.int32), (rows, 1)),
          "plm_perm": perm, "plm_target_weights": np.ones((rows, P), np.float32)}


def _init(module, *args, **kwargs):
  return nn.meta.unbox(module.init(jax.random.key(0), *args, **kwargs))


def _paths(params):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}


# ---- RoPE ----

def test_rotary_keeps_norms():
  x = _normal(2, 5, 3, 8)
  positions = np.arange(10).reshape(2, 5) * 7
  turned = np.asarray(rotary(jnp.asarray(x), jnp.asarray(positions), 10000.0))
  np.testing.assert_allclose(np.linalg.norm(turned, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-5)


def test_rotary_turns_each_pair_by_position_times_frequency():
  """Pair i is features (i, i + K/2): at position m it turns by m * theta^(-2i/K)."""
  head_dim, theta, m = 8, 100.0, 3
  for i in range(head_dim // 2):
    x = np.zeros((1, 1, 1, head_dim), np.float32)
    x[..., i], x[..., i + head_dim // 2] = 0.6, 0.8
    turned = np.asarray(rotary(jnp.asarray(x), jnp.full((1, 1), m), theta))[0, 0, 0]
    angle = m * theta ** (-2 * i / head_dim)
    want = np.zeros(head_dim, np.float32)
    want[i] = 0.6 * math.cos(angle) - 0.8 * math.sin(angle)
    want[i + head_dim // 2] = 0.6 * math.sin(angle) + 0.8 * math.cos(angle)
    np.testing.assert_allclose(turned, want, atol=1e-6)


def test_rotary_score_depends_on_the_offset_only():
  """rotary(q, m) . rotary(k, n) is a function of n - m: the same for (m, n) and (m + s, n + s),
  different for another offset."""
  q, k = jnp.asarray(_normal(1, 1, 1, 16, seed=1)), jnp.asarray(_normal(1, 1, 1, 16, seed=2))

  def score(m, n):
    return float(jnp.sum(rotary(q, jnp.full((1, 1), m), 1e4) * rotary(k, jnp.full((1, 1), n), 1e4)))

  for m, n in ((0, 3), (5, 2), (7, 7)):
    for shift in (1, 10, 123):
      assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-4)
  assert abs(score(0, 3) - score(0, 4)) > 1e-3


def test_rope_attention_is_unchanged_by_shifting_every_position():
  """Shifting every query and key position by a constant leaves the scores, hence the output,
  unchanged; positions that are not a shift change it."""
  attention = MultiHeadAttention(ROPE)
  q, kv = jnp.asarray(_normal(2, 6, 32, seed=3)), jnp.asarray(_normal(2, 6, 32, seed=4))
  mask = jnp.ones((1, 1, 6, 6), bool)
  params = _init(attention, q, kv, mask, True)
  base = np.asarray(attention.apply(params, q, kv, mask, True))
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  for shift in (1, 7, 100):
    shifted = attention.apply(params, q, kv, mask, True, (positions + shift, positions + shift))
    np.testing.assert_allclose(np.asarray(shifted), base, atol=2e-5)
  swapped = attention.apply(params, q, kv, mask, True, (positions, positions[:, ::-1]))
  assert np.abs(np.asarray(swapped) - base).max() > 1e-3


def test_rope_has_no_position_table_and_sees_order():
  encoder = Encoder(ROPE)
  batch = _batch()
  ids, types = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"])
  params = _init(encoder, ids, types, deterministic=True)
  assert "position" not in params["params"]["embeddings"]
  out = np.asarray(encoder.apply(params, ids, types, deterministic=True).sequence_BLD)
  # Two tokens swapped: everything changes, although attention alone is order-blind.
  swapped = ids.at[:, [3, 4]].set(ids[:, [4, 3]])
  moved = np.asarray(encoder.apply(params, swapped, types, deterministic=True).sequence_BLD)
  assert np.abs(moved[:, 0] - out[:, 0]).max() > 1e-3


def _plm_example():
  """Distinct tokens and a proper PLM order (non-targets, then targets) per row."""
  batch = _batch()
  rng = np.random.default_rng(5)
  perms = []
  for row in range(B):
    targets = rng.permutation(np.flatnonzero(batch["input_ids"][row] != PAD_ID))[:P]
    perms.append(np.concatenate([np.setdiff1d(np.arange(L), targets), targets]))
  batch["plm_perm"] = np.stack(perms).astype(np.int32)
  return batch


def test_rope_permuted_view_equals_the_original_order():
  """Both streams of the permuted view (rotated by the given original positions) equal the
  original order's, with XLNet's visibility written as dense per-example masks."""
  encoder = Encoder(ROPE)
  batch = _plm_example()
  params = _init(encoder, **permuted_inputs(batch), deterministic=True)
  out = encoder.apply(params, **permuted_inputs(batch), deterministic=True)
  perm = batch["plm_perm"]
  inverse = np.argsort(perm, axis=1)
  content = np.take_along_axis(np.asarray(out.sequence_BLD), inverse[..., None], axis=1)
  # Visibility in the original order, from each position's place in the permuted sequence.
  slot = inverse
  first_target = L - P
  content_11LL, query_11PL = (np.asarray(m)[0, 0] for m in two_stream_masks(L, P))
  valid = batch["input_ids"] != PAD_ID
  content_sees = np.stack([content_11LL[slot[b]][:, slot[b]] for b in range(B)]) & valid[:, None]
  query_sees = np.stack([query_11PL[:, slot[b]] for b in range(B)]) & valid[:, None]
  dense = encoder.apply(
      params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"]),
      deterministic=True, mask_BHQK=jnp.asarray(content_sees)[:, None],
      query=QueryStream(mask_BHPK=jnp.asarray(query_sees)[:, None],
                        positions_BP=jnp.asarray(perm[:, first_target:]),
                        token_type_ids_BP=jnp.zeros((B, P), jnp.int32)))
  np.testing.assert_allclose(np.asarray(dense.sequence_BLD)[valid], content[valid], atol=2e-5)
  np.testing.assert_allclose(np.asarray(dense.query_BPD), np.asarray(out.query_BPD), atol=2e-5)


def test_rope_identity_permutation_equals_the_plain_pass():
  """With the identity as the order, the permuted view's content stream (explicit positions
  0..L-1) is the plain pass with the same mask (default positions)."""
  encoder = Encoder(ROPE)
  batch = _batch()
  batch["plm_perm"] = np.tile(np.arange(L, dtype=np.int32), (B, 1))
  inputs = permuted_inputs(batch)
  params = _init(encoder, **inputs, deterministic=True)
  permuted = encoder.apply(params, **inputs, deterministic=True)
  plain = encoder.apply(params, inputs["input_ids_BL"], inputs["token_type_ids_BL"],
                        deterministic=True, mask_BHQK=inputs["mask_BHQK"])
  np.testing.assert_allclose(np.asarray(permuted.sequence_BLD), np.asarray(plain.sequence_BLD),
                             atol=1e-6)


def test_rope_causal_view_reads_no_later_token():
  encoder = Encoder(ROPE)
  batch = _batch()
  ids, types = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"])
  params = _init(encoder, ids, types, deterministic=True, causal=True)
  base = np.asarray(encoder.apply(params, ids, types, deterministic=True,
                                  causal=True).sequence_BLD)
  other = ids.at[:, 6].set(5 + (ids[:, 6] - 5 + 13) % (CONFIG.vocab_size - 5))
  changed = np.asarray(encoder.apply(params, other, types, deterministic=True,
                                     causal=True).sequence_BLD)
  np.testing.assert_array_equal(changed[:2, :6], base[:2, :6])
  assert np.abs(changed[:2, 6:] - base[:2, 6:]).max() > 1e-4


# ---- Gated MLPs, biases, norms ----

def _gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def _silu(x):
  return x / (1.0 + np.exp(-x))


@pytest.mark.parametrize("activation, act", [("geglu", _gelu), ("swiglu", _silu)])
def test_gated_mlp_computes_its_definition(activation, act):
  """`wo(act(h W_gate + b_gate) * (h W_up + b_up)) + b_wo`, by hand in numpy."""
  mlp = Mlp(dataclasses.replace(CONFIG, mlp_activation=activation))
  h = _normal(2, 5, 32, seed=6)
  params = _init(mlp, jnp.asarray(h))
  params = jax.tree_util.tree_map(lambda x: x + 0.1, params)  # Non-zero biases.
  p = jax.tree_util.tree_map(np.asarray, params["params"])
  assert set(p) == {"wi_gate", "wi_up", "wo"}
  gate = h @ p["wi_gate"]["kernel"] + p["wi_gate"]["bias"]
  up = h @ p["wi_up"]["kernel"] + p["wi_up"]["bias"]
  want = (act(gate) * up) @ p["wo"]["kernel"] + p["wo"]["bias"]
  np.testing.assert_allclose(np.asarray(mlp.apply(params, jnp.asarray(h))), want, rtol=2e-5,
                             atol=2e-5)


def test_plain_mlp_keeps_bert_names():
  params = _init(Mlp(CONFIG), jnp.zeros((1, 2, 32)))["params"]
  assert set(params) == {"wi", "wo"}


def _every_head_params(config):
  model = Pretrainer(config, heads=HEADS, views=VIEWS)
  return _init(model, _batch(), deterministic=True)


def test_no_bias_leaves_no_bias_anywhere():
  config = dataclasses.replace(CONFIG, use_bias=False, pre_layer_norm=True)
  paths = _paths(_every_head_params(config))
  assert not [p for p in paths if "'bias'" in p]
  assert "['params']['encoder']['final_norm']['scale']" in paths  # LayerNorm: scale only.
  assert "['params']['encoder']['layer_0']['attention']['query']['kernel']" in paths


def test_rms_norm_computes_its_definition():
  config = dataclasses.replace(CONFIG, norm="rms_norm", layer_norm_eps=1e-6)
  norm = init.norm(config, "norm")
  x = _normal(3, 32, seed=7) * 3 + 1
  params = _init(norm, jnp.asarray(x))
  assert set(params["params"]) == {"scale"}
  params = jax.tree_util.tree_map(lambda s: s * np.linspace(0.5, 2, 32, dtype=np.float32), params)
  scale = np.asarray(params["params"]["scale"])
  want = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(np.asarray(norm.apply(params, jnp.asarray(x))), want, rtol=1e-5)


def test_rms_norm_everywhere():
  paths = _paths(_every_head_params(dataclasses.replace(CONFIG, norm="rms_norm")))
  norms = [p for p in paths if "norm" in p]
  assert norms and all(p.endswith("['scale']") for p in norms)


# ---- ModernBERT's layout: no token types, no norm before layer 0's attention ----

def test_no_token_type_table_ignores_token_types():
  config = dataclasses.replace(CONFIG, type_vocab_size=0)
  model = Pretrainer(config, heads=(("mlm", MlmHead), ("nsp", NspHead)))
  batch = _batch()
  params = _init(model, batch, deterministic=True)
  assert "token_type" not in params["params"]["encoder"]["embeddings"]
  assert "token_type" in _init(Pretrainer(CONFIG, heads=(("mlm", MlmHead),)), batch,
                               deterministic=True)["params"]["encoder"]["embeddings"]
  out = model.apply(params, batch, deterministic=True)
  segments = dict(batch, token_type_ids=np.ones_like(batch["token_type_ids"]))
  other = model.apply(params, segments, deterministic=True)
  for name in ("mlm", "nsp"):  # NSP reads the pooled [CLS] only: no table needed.
    assert np.isfinite(np.asarray(out[name])).all()
    np.testing.assert_array_equal(np.asarray(other[name]), np.asarray(out[name]))


def test_first_layer_without_attention_norm():
  """Layer 0 attends over the embedding output as it is; every later layer keeps its norm."""
  config = dataclasses.replace(CONFIG, pre_layer_norm=True, first_layer_attention_norm=False)
  model = Pretrainer(config, heads=HEADS, views=VIEWS)  # The query stream's pass included.
  batch = _batch()
  params = _init(model, batch, deterministic=True)
  encoder = params["params"]["encoder"]
  assert "attention_norm" not in encoder["layer_0"] and "mlp_norm" in encoder["layer_0"]
  assert "attention_norm" in encoder["layer_1"]
  assert all(np.isfinite(np.asarray(v)).all()
             for v in model.apply(params, batch, deterministic=True).values())
  post_ln = _init(Pretrainer(dataclasses.replace(config, pre_layer_norm=False),
                             heads=(("mlm", MlmHead),)), batch, deterministic=True)
  assert "attention_norm" in post_ln["params"]["encoder"]["layer_0"]  # Read with pre-LN only.


def test_layer_without_attention_norm_computes_its_definition():
  """`x + attention(x)`, then `+ mlp(norm(.))`: the attention reads its input un-normalised."""
  config = dataclasses.replace(CONFIG, pre_layer_norm=True, first_layer_attention_norm=False)
  layer = TransformerLayer(config, attention_norm=False)
  x, mask = jnp.asarray(_normal(2, 6, 32, seed=8) * 3 + 1), jnp.ones((1, 1, 6, 6), bool)
  params = _init(layer, x, mask, True)["params"]
  assert set(params) == {"attention", "mlp", "mlp_norm"}
  h = x + MultiHeadAttention(config).apply({"params": params["attention"]}, x, x, mask, True)
  normed = init.norm(config).apply({"params": params["mlp_norm"]}, h)
  want = h + Mlp(config).apply({"params": params["mlp"]}, normed)
  np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x, mask, True)),
                             np.asarray(want), rtol=1e-5, atol=1e-5)


def test_first_layer_without_attention_norm_refuses_scanned_layers():
  config = models.bert("tiny")
  config.update(pre_layer_norm=True, first_layer_attention_norm=False, scan_layers=True)
  with pytest.raises(UserError, match="model.first_layer_attention_norm is False.*scan_layers"):
    ModelConfig.from_config(config)
  config.scan_layers = False
  assert not ModelConfig.from_config(config).first_layer_attention_norm


# ---- The output embedding and the head transform ----

def _mlm_loss(model, params, batch):
  logits = model.apply(params, batch, deterministic=True)["mlm"]
  labels = jnp.take_along_axis(batch["input_ids"], batch["mlm_positions"], axis=1)
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1))


def test_untied_output_embedding_is_its_own_trained_table():
  config = dataclasses.replace(CONFIG, tie_output_embedding=False)
  model = Pretrainer(config, heads=(("mlm", MlmHead),))
  batch = _batch()
  params = _init(model, batch, deterministic=True)
  table = params["params"]["mlm"]["output_embedding"]
  assert table.shape == (CONFIG.vocab_size, CONFIG.hidden_size)
  grads = jax.jit(jax.grad(functools.partial(_mlm_loss, model)))(params, batch)["params"]
  assert np.abs(np.asarray(grads["mlm"]["output_embedding"])).max() > 0
  # The token table still learns, from the input side.
  assert np.abs(np.asarray(grads["encoder"]["embeddings"]["token"]["embedding"])).max() > 0
  mask = optimizer.decay_mask(params)
  assert mask["params"]["mlm"]["output_embedding"] is True
  tied = _init(Pretrainer(CONFIG, heads=(("mlm", MlmHead),)), batch, deterministic=True)
  assert "output_embedding" not in tied["params"]["mlm"]


def test_head_transform_off_gives_logits_straight_from_the_encoder():
  config = dataclasses.replace(CONFIG, mlm_head_transform=False)
  model = Pretrainer(config, heads=(("mlm", MlmHead),))
  batch = _batch()
  params = _init(model, batch, deterministic=True)
  assert set(params["params"]["mlm"]) == {"bias"}
  params = jax.tree_util.tree_map(lambda x: x + 0.05, params)
  logits = np.asarray(model.apply(params, batch, deterministic=True)["mlm"])
  encoded = Encoder(config).apply({"params": params["params"]["encoder"]},
                                  batch["input_ids"], batch["token_type_ids"], deterministic=True)
  h = np.take_along_axis(np.asarray(encoded.sequence_BLD), batch["mlm_positions"][..., None], 1)
  p = params["params"]
  want = h @ np.asarray(p["encoder"]["embeddings"]["token"]["embedding"]).T + np.asarray(
      p["mlm"]["bias"])
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


# ---- Config, FLOPs, weight decay, export ----

def test_model_config_piece_declares_every_key_with_bert_defaults():
  piece = models.bert("tiny")
  assert set(piece) == {f.name for f in dataclasses.fields(ModelConfig)}
  for key in MODERN:
    if key != "pre_layer_norm":
      assert piece[key] == getattr(ModelConfig, key), key


@pytest.mark.parametrize("key, value", [("mlp_activation", "relu"), ("norm", "batch_norm"),
                                        ("position_encoding", "alibi")])
def test_bad_choice_names_the_key(key, value):
  config = models.bert("tiny")
  config[key] = value
  with pytest.raises(UserError, match=f"model.{key} is '{value}'"):
    ModelConfig.from_config(config)


def test_rope_needs_an_even_head_size():
  config = models.bert("tiny")
  config.update(position_encoding="rope", hidden_size=126, num_heads=2)
  with pytest.raises(UserError, match="odd"):
    ModelConfig.from_config(config)


def test_a_run_saved_before_the_options_loads_as_bert():
  old = dict(models.bert("tiny"))
  for key in ("rope_theta", "mlp_activation", "use_bias", "norm", "tie_output_embedding",
              "mlm_head_transform", "first_layer_attention_norm"):
    del old[key]
  loaded = ModelConfig.from_config(ml_collections.ConfigDict(old))
  assert (loaded.mlp_activation, loaded.use_bias, loaded.norm) == ("gelu", True, "layer_norm")
  assert loaded.first_layer_attention_norm


def test_gated_mlp_flops_count_three_matrices():
  gated = dataclasses.replace(CONFIG, mlp_activation="swiglu")
  difference = flops.encoder_flops_per_token(gated, L) - flops.encoder_flops_per_token(CONFIG, L)
  assert difference == 6 * CONFIG.num_layers * CONFIG.hidden_size * CONFIG.mlp_dim


def test_weight_decay_mask_places_every_parameter_with_every_option():
  mask = optimizer.decay_mask(_every_head_params(ALL_ON))  # Raises on an unplaced name.
  encoder = mask["params"]["encoder"]
  assert encoder["layer_0"]["mlp"]["wi_gate"]["kernel"] is True
  assert encoder["layer_0"]["mlp_norm"]["scale"] is False


@pytest.mark.parametrize("key", ["position_encoding", "mlp_activation", "use_bias", "norm",
                                 "tie_output_embedding", "mlm_head_transform"])
def test_export_refuses_each_option_by_name(key):
  with pytest.raises(UserError, match=f"model.{key} is"):
    convert.check_exportable(dataclasses.replace(CONFIG, **{key: MODERN[key]}))


# ---- Every option at once: a sharded mesh and a checkpoint ----

# Every dimension a rule may split is divisible by 2; the head size (8) is even for RoPE.
MESH_CONFIG = dataclasses.replace(ALL_ON, vocab_size=128, hidden_size=32, num_heads=4,
                                  mlp_dim=64, num_layers=1, initializer_range=0.02)


def _sharded_setting(devices, sizes):
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(
      dict(data=sizes[0], fsdp=sizes[1], tensor=sizes[2], rules="")), devices=devices)
  rules = rules_lib.DEFAULT_RULES
  model = Pretrainer(MESH_CONFIG, heads=HEADS, views=VIEWS)
  tx, _ = optimizer.make_optimizer(optimizers.adamw_bert(), 100)
  shapes = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype) for k, v in _batch().items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings = state_lib.abstract_state(model, tx, shapes, mesh, rules)
    state = state_lib.init_state(jax.random.key(0), model, tx, shapes, shardings)
  return mesh, rules, model, abstract, state


def _loss_and_grad_norm(mesh, rules, model, params):
  """Every head's mean cross-entropy, summed, and the global norm of its gradient."""
  batch = _batch()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    batch = jax.device_put(batch, rules_lib.batch_sharding(mesh, rules))

    def loss(params):
      outputs = model.apply({"params": params}, batch, deterministic=True)
      total = 0.0
      for name, labels in (("mlm", jnp.take_along_axis(batch["input_ids"],
                                                       batch["mlm_positions"], axis=1)),
                           ("clm", batch["input_ids"]),
                           ("plm", jnp.take_along_axis(batch["input_ids"],
                                                       batch["plm_perm"][:, L - P:], axis=1)),
                           ("nsp", batch["next_sentence_label"])):
        log_probs = jax.nn.log_softmax(outputs[name])
        total -= jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))
      return total

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), float(optax.tree.norm(grads))


@pytest.fixture(scope="module")
def sharded():
  """Every option, on a data=2 x fsdp=2 x tensor=2 mesh."""
  devices = jax.devices("cpu")
  assert len(devices) >= 8, "Run with XLA_FLAGS=--xla_force_host_platform_device_count=8."
  return _sharded_setting(devices[:8], (2, 2, 2))


def test_every_option_on_a_sharded_mesh_gives_the_one_device_loss(sharded):
  mesh, rules, model, _, state = sharded
  assert "attention_norm" not in state.params["encoder"]["layer_0"]
  assert "token_type" not in state.params["encoder"]["embeddings"]
  kernel = state.params["encoder"]["layer_0"]["mlp"]["wi_gate"]["kernel"]
  assert {s.data.shape for s in kernel.addressable_shards} == {
      (MESH_CONFIG.hidden_size // 2, MESH_CONFIG.mlp_dim // 2)}
  table = state.params["mlm"]["output_embedding"]
  assert {s.data.shape for s in table.addressable_shards} == {  # vocab: tensor, embed: fsdp.
      (MESH_CONFIG.vocab_size // 2, MESH_CONFIG.hidden_size // 2)}
  # The same parameter values, whole on one device.
  one = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, rules="")),
                           devices=jax.devices("cpu")[:1])
  whole = jax.device_put(jax.tree_util.tree_map(np.asarray, state.params),
                         rules_lib.replicated(one))
  loss_one, norm_one = _loss_and_grad_norm(one, rules, model, whole)
  loss_many, norm_many = _loss_and_grad_norm(mesh, rules, model, state.params)
  assert np.isfinite(loss_one) and norm_one > 0
  assert loss_many == pytest.approx(loss_one, rel=1e-5)
  assert norm_many == pytest.approx(norm_one, rel=1e-5)


def test_every_option_round_trips_through_a_checkpoint(sharded, tmp_path):
  mesh, rules, _, abstract, state = sharded
  state = jax.tree_util.tree_map(lambda x: x + jnp.ones_like(x), state)  # Unlike a fresh one.
  directory = str(tmp_path / "checkpoints")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    checkpointer = checkpoints.Checkpointer(directory, keep=1)
    checkpointer.save(7, state, {"step": 7})
    checkpointer.wait()
    checkpointer.close()
    checkpointer = checkpoints.Checkpointer(directory, keep=1)
    try:
      restored, position = checkpointer.restore_newest(abstract)
    finally:
      checkpointer.close()
  assert position == {"step": 7}
  assert "output_embedding" in restored.params["mlm"]
  got, want = jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)
  assert len(got) == len(want)
  for leaf, expected, target in zip(got, want, jax.tree_util.tree_leaves(abstract)):
    assert leaf.shape == expected.shape and leaf.sharding == target.sharding
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))
