"""Guards of a long run: non-finite steps change nothing, a dtype change is refused, and the
rule table is overridden with checked entries."""

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import optimizers
from jaxlm.errors import UserError
from jaxlm.models import MlmHead, ModelConfig, Pretrainer
from jaxlm.objectives import DataSpec, build_objectives
from jaxlm.parallel import rules as rules_lib
from jaxlm.parallel.mesh import make_mesh
from jaxlm.training import checkpoints, optimizer, state as state_lib, step as step_lib

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
                     max_position=16)


def _setup(config=CONFIG, microbatches=1):
  spec = DataSpec(vocab_size=64, seq_len=16, word_start=np.ones(64, bool))
  objectives = build_objectives(ml_collections.ConfigDict(
      {"mlm": dict(weight=1.0, mask_rate=0.15, max_predictions_per_seq=3, mask_token_prob=0.8,
                   random_token_prob=0.1, whole_word=False)}), spec)
  model = Pretrainer(config, heads=(("mlm", MlmHead),))
  tx, schedule = optimizer.make_optimizer(optimizers.adamw_bert(1e-3, 0), 10)
  rng = np.random.default_rng(0)
  batch = {
      "input_ids": jnp.asarray(rng.integers(5, 64, (4, 16)), jnp.int32),
      "token_type_ids": jnp.zeros((4, 16), jnp.int32),
      "mlm_positions": jnp.asarray([[1, 2, 3]] * 4, jnp.int32),
      "mlm_ids": jnp.asarray(rng.integers(5, 64, (4, 3)), jnp.int32),
      "mlm_weights": jnp.ones((4, 3), jnp.float32),
  }
  params = nn.meta.unbox(model.init(jax.random.key(0), batch, deterministic=True))["params"]
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
  step = jax.jit(functools.partial(step_lib.train_step, model=model, objectives=objectives,
                                   tx=tx, schedule=schedule, microbatches=microbatches))
  return state, batch, step


def test_a_non_finite_step_leaves_parameters_and_moments_untouched():
  state, batch, step = _setup()
  state, _ = step(state, batch, jax.random.key(1))  # Moments are non-zero from here on.
  poisoned = state.params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"].at[0, 0].set(jnp.nan)
  params = jax.tree_util.tree_map(lambda x: x, state.params)
  params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"] = poisoned
  bad = state.replace(params=params)
  after, metrics = step(bad, batch, jax.random.key(1))
  assert int(metrics["skipped"]) == 1
  assert not np.isfinite(float(metrics["loss"]))
  assert int(after.step) == int(bad.step) + 1
  for new, old in zip(jax.tree_util.tree_leaves((after.params, after.opt_state)),
                      jax.tree_util.tree_leaves((bad.params, bad.opt_state))):
    np.testing.assert_array_equal(new, old)


def test_a_finite_step_updates():
  state, batch, step = _setup()
  after, metrics = step(state, batch, jax.random.key(1))
  assert int(metrics["skipped"]) == 0
  kernel = ("encoder", "layer_0", "mlp", "wi", "kernel")
  old, new = state.params, after.params
  for key in kernel:
    old, new = old[key], new[key]
  assert not np.array_equal(np.asarray(old), np.asarray(new))


def test_microbatches_give_the_update_of_the_whole_batch():
  """Without dropout, and with equal predictions per slice, two slices equal one batch."""
  config = ModelConfig(**{**CONFIG.__dict__, "dropout_rate": 0.0, "attention_dropout_rate": 0.0})
  whole, batch, step_whole = _setup(config)
  sliced, _, step_sliced = _setup(config, microbatches=2)
  after_whole, m_whole = step_whole(whole, batch, jax.random.key(1))
  after_sliced, m_sliced = step_sliced(sliced, batch, jax.random.key(1))
  np.testing.assert_allclose(m_sliced["loss"], m_whole["loss"], rtol=1e-5)
  assert float(m_sliced["mlm_loss/count"]) == float(m_whole["mlm_loss/count"]) == 12.0
  np.testing.assert_allclose(m_sliced["grad_norm"], m_whole["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(after_sliced.params),
                  jax.tree_util.tree_leaves(after_whole.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_restoring_with_another_dtype_is_refused(tmp_path):
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                   devices=jax.devices()[:1])
  rules = rules_lib.DEFAULT_RULES
  shapes = {"input_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
            "token_type_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
            "mlm_positions": jax.ShapeDtypeStruct((1, 3), jnp.int32)}
  tx, _ = optimizer.make_optimizer(optimizers.adamw_bert(1e-3, 0), 10)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    model = Pretrainer(CONFIG, heads=(("mlm", MlmHead),))
    abstract, shardings = state_lib.abstract_state(model, tx, shapes, mesh, rules)
    state = state_lib.init_state(jax.random.key(0), model, tx, shapes, shardings)
    saver = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    saver.save(1, state, {"step": 1})
    saver.wait()
    saver.close()
    bf16 = Pretrainer(ModelConfig(**{**CONFIG.__dict__, "param_dtype": jnp.bfloat16}),
                      heads=(("mlm", MlmHead),))
    abstract_bf16, _ = state_lib.abstract_state(bf16, tx, shapes, mesh, rules)
    loader = checkpoints.Checkpointer(str(tmp_path / "ckpt"), keep=2)
    with pytest.raises(UserError, match="bfloat16"):
      loader.restore_newest(abstract_bf16)
    restored, position = loader.restore_newest(abstract)
    loader.close()
  assert position == {"step": 1}
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_rule_overrides_replace_entries_and_are_checked():
  table = dict(rules_lib.rules_from_config(
      ml_collections.ConfigDict(dict(rules="vocab=none, mlp=fsdp+tensor"))))
  assert table["vocab"] is None
  assert table["mlp"] == ("fsdp", "tensor")
  assert table["heads"] == "tensor"  # Untouched entries keep their default.
  with pytest.raises(UserError, match="Did you mean 'vocab'"):
    rules_lib.parse_rules("vocb=none")
  with pytest.raises(UserError, match="not a mesh axis"):
    rules_lib.parse_rules("vocab=tensr")


def test_a_rule_that_cannot_apply_is_refused_not_dropped():
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)),
                   devices=jax.devices()[:8])
  rules = rules_lib.rules_from_config(ml_collections.ConfigDict(dict(rules="mlp=fsdp")))
  shapes = {"input_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
            "token_type_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
            "mlm_positions": jax.ShapeDtypeStruct((1, 3), jnp.int32)}
  tx, _ = optimizer.make_optimizer(optimizers.adamw_bert(1e-3, 0), 10)
  model = Pretrainer(CONFIG, heads=(("mlm", MlmHead),))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    with pytest.raises(UserError, match=r"\['mlp'\]\['wi'\]\['kernel'\].*'mlp'"):
      state_lib.abstract_state(model, tx, shapes, mesh, rules)


@pytest.mark.parametrize("options", [
    dict(mask_token_prob=0.9, random_token_prob=0.2),
    dict(max_predictions_per_seq=0),
    dict(mask_rate=1.5),
])
def test_impossible_masking_options_are_refused(options):
  spec = DataSpec(vocab_size=64, seq_len=16, word_start=np.ones(64, bool))
  mlm = dict(weight=1.0, mask_rate=0.15, max_predictions_per_seq=3, mask_token_prob=0.8,
             random_token_prob=0.1, whole_word=False)
  mlm.update(options)
  with pytest.raises(UserError, match="objectives.mlm"):
    build_objectives(ml_collections.ConfigDict({"mlm": mlm}), spec)


def test_a_save_cut_by_a_kill_is_ignored_cleaned_and_saved_again(tmp_path):
  """A SIGKILL during an async save leaves `<step>.orbax-checkpoint-tmp`; it must not count."""
  mesh = make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                   devices=jax.devices()[:1])
  rules = rules_lib.DEFAULT_RULES
  shapes = {"input_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
            "token_type_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
            "mlm_positions": jax.ShapeDtypeStruct((1, 3), jnp.int32)}
  tx, _ = optimizer.make_optimizer(optimizers.adamw_bert(1e-3, 0), 10)
  directory = tmp_path / "ckpt"
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    model = Pretrainer(CONFIG, heads=(("mlm", MlmHead),))
    abstract, shardings = state_lib.abstract_state(model, tx, shapes, mesh, rules)
    state = state_lib.init_state(jax.random.key(0), model, tx, shapes, shardings)
    first = checkpoints.Checkpointer(str(directory), keep=3)
    first.save(2, state, {"step": 2})
    first.wait()
    first.close()
    cut = directory / "4.orbax-checkpoint-tmp"
    (cut / "state").mkdir(parents=True)
    (cut / "state" / "partial").write_bytes(b"\0" * 100)
    again = checkpoints.Checkpointer(str(directory), keep=3)
    assert again.steps() == [2]
    deadline = time.time() + 20  # orbax removes it in the background.
    while cut.exists() and time.time() < deadline:
      time.sleep(0.1)
    assert not cut.exists()
    _, position = again.restore_newest(abstract)
    assert position == {"step": 2}
    again.save(4, state, {"step": 4})
    again.wait()
    assert again.steps() == [2, 4]
    again.close()
