"""LoRA as a transformation of parameter trees: shapes, counts, the merge, gradients, sharding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from jaxlm.errors import UserError
from jaxlm.models import ModelConfig, Pretrainer
from jaxlm.objectives import Classify
from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib
from jaxlm.training import lora

CONFIG = ModelConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
                     max_position=32)
OBJECTIVE = Classify(2)
QV = lora.LoraOptions(rank=4, alpha=8.0, targets=("query", "value"))
ALL = lora.LoraOptions(rank=4, alpha=8.0, targets=("attention", "mlp"))


def _batch():
  rng = np.random.default_rng(1)
  ids = rng.integers(5, CONFIG.vocab_size, (3, 12)).astype(np.int32)
  ids[:, 0], ids[:, 9], ids[:, 10:] = CLS_ID, SEP_ID, PAD_ID
  return {"input_ids": ids, "token_type_ids": np.zeros_like(ids),
          "labels": np.array([0, 1, 1], np.int32), "label_weights": np.ones(3, np.float32)}


def _model(scan: bool) -> Pretrainer:
  return Pretrainer(dataclasses.replace(CONFIG, scan_layers=scan),
                    heads=((OBJECTIVE.name, OBJECTIVE.head),))


def _abstract(scan: bool):
  """The boxed parameter shapes of `_model(scan)`."""
  model = _model(scan)
  return jax.eval_shape(lambda r: model.init({"params": r}, _batch(), deterministic=True),
                        jax.random.key(0))["params"]


def _adapter_shapes(params, options):
  """What init_adapters makes, as shapes only (no compilation)."""
  return jax.eval_shape(lambda r: lora.init_adapters(r, params, options), jax.random.key(0))


def _random(tree, seed=0, scale=0.2):
  """Arrays of `tree`'s shapes (values drawn here: compiling the initialiser costs seconds)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), nn.meta.unbox(tree))


@pytest.mark.parametrize("options, words", [
    (dict(rank=0, alpha=1.0, targets=("query",)), ["rank is 0", "positive"]),
    (dict(rank=-2, alpha=1.0, targets=("query",)), ["rank is -2"]),
    (dict(rank=4, alpha=1.0, targets=("qeury",)), ["Unknown LoRA target 'qeury'", "'query'"]),
    (dict(rank=4, alpha=1.0, targets=()), ["no targets"]),
])
def test_bad_options_are_user_errors(options, words):
  with pytest.raises(UserError) as info:
    lora.LoraOptions(**options)
  assert all(word in str(info.value) for word in words)


def test_a_target_this_model_lacks_is_an_error():
  options = lora.LoraOptions(rank=4, alpha=4.0, targets=("query", "position"))
  with pytest.raises(UserError, match=r"\['position'\] match no kernel"):
    lora.init_adapters(jax.random.key(0), _abstract(False), options)


def test_options_take_config_values():
  options = lora.LoraOptions(rank=np.int64(8), alpha=16, targets=["query", "value"])
  assert (options.rank, options.alpha, options.targets) == (8, 16.0, ("query", "value"))
  assert isinstance(options.rank, int) and options.scale == 2.0 and hash(options)
  with pytest.raises(UserError, match="rank is 2.5"):
    lora.LoraOptions(rank=2.5, alpha=1.0, targets=("query",))


def test_groups_expand_to_projections():
  assert ALL.projections == ("query", "key", "value", "out", "wi", "wi_gate", "wi_up", "wo")
  assert lora.LoraOptions(4, 1.0, ("mlp", "wi", "value")).projections == (
      "value", "wi", "wi_gate", "wi_up", "wo")


def test_the_mlp_group_finds_gated_projections():
  """`mlp` adapts what the model's MLP has: wi and wo, or wi_gate, wi_up and wo."""
  mlp = lora.LoraOptions(2, 1.0, ("mlp",))
  assert {p[-1] for p in lora.target_paths(_abstract(False), mlp)} == {"wi", "wo"}
  with pytest.raises(UserError, match="wi_gate"):
    lora.target_paths(_abstract(False), lora.LoraOptions(2, 1.0, ("wi_gate",)))
  gated = Pretrainer(dataclasses.replace(CONFIG, mlp_activation="geglu"),
                     heads=((OBJECTIVE.name, OBJECTIVE.head),))
  params = jax.eval_shape(lambda r: gated.init({"params": r}, _batch(), deterministic=True),
                          jax.random.key(0))["params"]
  assert {p[-1] for p in lora.target_paths(params, mlp)} == {"wi_gate", "wi_up", "wo"}


@pytest.mark.parametrize("scan", [False, True], ids=["layer_i", "scanned"])
def test_adapter_shapes_and_count(scan):
  params = _abstract(scan)  # Shapes are all init_adapters reads.
  adapters = _adapter_shapes(params, QV)
  lead = (2,) if scan else ()
  layers = [adapters["encoder"]["layers"]["layer"]] if scan else [
      adapters["encoder"][f"layer_{i}"] for i in range(2)]
  for layer in layers:
    assert set(layer) == {"attention"} and set(layer["attention"]) == {"query", "value"}
    assert layer["attention"]["query"]["a"].shape == lead + (32, 4)  # D x r.
    assert layer["attention"]["query"]["b"].shape == lead + (4, 32)  # r x (H K).
  # Per kernel r (in + out) = 4 x (32 + 32); two kernels in each of two layers.
  assert lora.count(adapters) == 2 * 2 * 4 * (32 + 32)
  assert lora.adapter_fraction(params, adapters) < 0.05
  everything = _adapter_shapes(params, ALL)
  # q, k, v, out: 4 x (32 + 32) each; wi: 4 x (32 + 64); wo: 4 x (64 + 32).
  assert lora.count(everything) == 2 * (4 * 4 * 64 + 2 * 4 * 96)
  out = (everything["encoder"]["layers"]["layer"] if scan else everything["encoder"]["layer_1"])
  assert out["attention"]["out"]["a"].shape == lead + (32, 4)  # [H, K, D]: in is H x K.
  assert out["mlp"]["wi"]["b"].shape == lead + (4, 64)


def _explicit(kernel, a, b, scale, inputs):
  """W + scale A B by loops over the layer axis, in numpy float64."""
  kernel, a, b = (np.asarray(x, np.float64) for x in (kernel, a, b))
  if a.ndim == 2:
    return kernel + scale * (a @ b).reshape(kernel.shape)
  return np.stack([_explicit(kernel[i], a[i], b[i], scale, inputs) for i in range(len(a))])


@pytest.mark.parametrize("scan", [False, True], ids=["layer_i", "scanned"])
def test_merge_equals_the_explicit_sum(scan):
  params = _random(_abstract(scan))
  before = jax.tree_util.tree_map(np.array, params)
  adapters = _random(_adapter_shapes(params, ALL), seed=2)  # B != 0: every target moves.
  merged = lora.merge(params, adapters, ALL)
  paths = lora.target_paths(params, ALL)
  assert len(paths) == (1 if scan else 2) * 6
  for path in paths:
    module, pair = lora._get(params, path), lora._get(adapters, path)
    want = _explicit(module["kernel"], pair["a"], pair["b"], ALL.scale,
                     lora.PROJECTIONS[path[-1]][1])
    got = lora._get(merged, path)["kernel"]
    assert got.shape == module["kernel"].shape and got.dtype == module["kernel"].dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got is not module["kernel"] and lora._get(merged, path)["bias"] is module["bias"]
  # Every other leaf is the base's own array, and the base tree is unchanged.
  assert merged["classify"] is params["classify"]
  assert merged["encoder"]["embeddings"] is params["encoder"]["embeddings"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)


@pytest.mark.parametrize("scan", [False, True], ids=["layer_i", "scanned"])
def test_zero_b_is_the_base_model_and_gradients_reach_the_adapters(scan):
  model, batch = _model(scan), _batch()
  params = _random(_abstract(scan))
  before = jax.tree_util.tree_map(np.array, params)
  adapters = lora.init_adapters(jax.random.key(1), params, QV)
  for path in lora.target_paths(params, QV):
    pair, fan_in = lora._get(adapters, path), 32
    np.testing.assert_array_equal(pair["b"], 0)
    assert 0.5 < float(jnp.std(pair["a"])) * fan_in ** 0.5 < 1.5  # A ~ N(0, 1 / in).
  # B = 0: every merged kernel is exactly the base one.
  jax.tree_util.tree_map(np.testing.assert_array_equal, lora.merge(params, adapters, QV), params)
  # Three adapter sets in one vmapped pass (one compilation): all zero (the base model itself),
  # as initialised, and moved off B = 0.
  zero = jax.tree_util.tree_map(jnp.zeros_like, adapters)
  moved = jax.tree_util.tree_map(lambda x: x + 0.1, adapters)
  sets = jax.tree_util.tree_map(lambda *x: jnp.stack(x), zero, adapters, moved)

  def loss(adapters, params):
    outputs = model.apply({"params": lora.merge(params, adapters, QV)}, batch,
                          deterministic=True)
    return OBJECTIVE.loss(outputs, batch)[0], outputs["classify"]

  grads, logits = jax.jit(jax.vmap(jax.grad(loss, has_aux=True), in_axes=(0, None)))(sets, params)
  np.testing.assert_array_equal(logits[1], logits[0])  # B = 0: exactly the base model's outputs.
  assert not np.allclose(logits[2], logits[0])
  for path in lora.target_paths(params, QV):
    got = lora._get(grads, path)
    assert float(jnp.abs(got["b"][1]).min(axis=-1).max()) > 0  # B learns from the first step...
    np.testing.assert_array_equal(got["a"][1], 0)  # ...A once B has moved (dL/dA = s dL/dW B^T).
    assert float(jnp.abs(got["a"][2]).sum()) > 0
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)


def test_merge_under_a_sharded_mesh():
  if jax.device_count() < 8:
    pytest.skip("needs the 8 simulated CPU devices of conftest.py")
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, rules="")))
  rules = rules_lib.DEFAULT_RULES
  boxed = _abstract(False)
  shardings = rules_lib.logical_shardings(boxed, mesh, rules)
  params = _random(boxed)
  adapters = _random(_adapter_shapes(params, ALL), seed=3)
  want = lora.merge(params, adapters, ALL)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.device_put(params, shardings)
    merged = jax.jit(lambda p, a: lora.merge(p, a, ALL), out_shardings=shardings)(
        sharded, adapters)
  query = merged["encoder"]["layer_0"]["attention"]["query"]["kernel"]
  assert query.sharding.spec == shardings["encoder"]["layer_0"]["attention"]["query"]["kernel"].spec
  assert query.sharding.spec[0] == "fsdp"  # embed is split, so the test really shards.
  jax.tree_util.tree_map(
      lambda g, w: np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-6), merged, want)
