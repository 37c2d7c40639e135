"""Checkpoints: the train state and data position round-trip; a cut newest checkpoint is skipped,
a newest one that merely fails to read is retried, then stops the run, never rewinds it."""

import glob
import json
import logging
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import optimizers
from jaxlm.errors import UserError
from jaxlm.models import MlmHead, ModelConfig, NspHead, Pretrainer
from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib
from jaxlm.training import checkpoints, optimizer, state as state_lib

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                     max_position=32)
BATCH = {
    "input_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
    "token_type_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
    "mlm_positions": jax.ShapeDtypeStruct((1, 4), jnp.int32),
}
STEPS = (10, 20, 30)
KEEP = 2


@pytest.fixture(scope="module")
def setting():
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  rules = rules_lib.DEFAULT_RULES
  model = Pretrainer(CONFIG, heads=(("mlm", MlmHead), ("nsp", NspHead)))
  tx, _ = optimizer.make_optimizer(optimizers.adamw_bert(), 100)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings = state_lib.abstract_state(model, tx, BATCH, mesh, rules)
    state = state_lib.init_state(jax.random.key(0), model, tx, BATCH, shardings)

    @jax.jit
    def advance(state, k):
      """A state unlike a fresh one: every leaf moved, differently for each k."""
      return jax.tree_util.tree_map(lambda x: x + (k * (1 + jnp.sin(x))).astype(x.dtype), state)

    states = {step: advance(state, step) for step in STEPS}
  return mesh, rules, abstract, states


@pytest.fixture(scope="module")
def saved(setting, tmp_path_factory):
  """A checkpoint folder written with STEPS and KEEP."""
  mesh, rules, _, states = setting
  directory = str(tmp_path_factory.mktemp("run") / "checkpoints")
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    checkpointer = checkpoints.Checkpointer(directory, keep=KEEP)
    for step in STEPS:
      checkpointer.save(step, states[step], {"step": step, "global_batch_size": 32})
    checkpointer.wait()
    checkpointer.close()
  return directory


def _restore(setting, directory):
  mesh, rules, abstract, _ = setting
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    checkpointer = checkpoints.Checkpointer(directory, keep=KEEP)
    try:
      return checkpointer.steps(), checkpointer.restore_newest(abstract)
    finally:
      checkpointer.close()


def _assert_same_state(got, want, abstract):
  got_leaves, got_tree = jax.tree_util.tree_flatten(got)
  want_leaves, want_tree = jax.tree_util.tree_flatten(want)
  assert got_tree == want_tree
  for leaf, expected, target in zip(got_leaves, want_leaves, jax.tree_util.tree_leaves(abstract)):
    assert leaf.dtype == expected.dtype and leaf.shape == expected.shape
    assert leaf.sharding == target.sharding
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))


def test_save_and_restore_round_trip(setting, saved):
  _, _, abstract, states = setting
  steps, restored = _restore(setting, saved)
  assert steps == list(STEPS[-KEEP:])  # Older ones are deleted.
  state, position = restored
  assert position == {"step": STEPS[-1], "global_batch_size": 32}
  assert int(state.step) == int(states[STEPS[-1]].step) != 0
  _assert_same_state(state, states[STEPS[-1]], abstract)


def test_nothing_to_restore(setting, tmp_path):
  steps, restored = _restore(setting, str(tmp_path / "checkpoints"))
  assert steps == [] and restored is None


def _cut(directory, step, which):
  files = [f for f in glob.glob(os.path.join(directory, str(step), "state", "**"), recursive=True)
           if os.path.isfile(f)]
  if which == "arrays":  # The array data only; the metadata still reads.
    files = [f for f in files if f"{os.sep}d{os.sep}" in f]
  assert files, os.listdir(os.path.join(directory, str(step), "state"))
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("which", ["all", "arrays"])
def test_cut_newest_checkpoint_falls_back_to_the_previous(setting, saved, tmp_path, which,
                                                          caplog):
  _, _, abstract, states = setting
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(saved, directory)
  _cut(directory, STEPS[-1], which)
  with caplog.at_level(logging.WARNING):
    steps, restored = _restore(setting, directory)
  assert steps == list(STEPS[-KEEP:])
  state, position = restored
  assert position["step"] == STEPS[-2]
  _assert_same_state(state, states[STEPS[-2]], abstract)
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert any(f"step {STEPS[-1]}" in m and "is damaged" in m for m in warnings), warnings


def test_no_checkpoint_restores(setting, saved, tmp_path):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(saved, directory)
  for step in STEPS[-KEEP:]:
    _cut(directory, step, "all")
  with pytest.raises(UserError, match="restores"):
    _restore(setting, directory)


@pytest.mark.parametrize("error, damage", [
    (json.JSONDecodeError("Expecting ','", "{", 1), True),
    (ValueError("OUT_OF_RANGE: Error reading byte range"), True),
    (ValueError("DATA_LOSS: checksum mismatch"), True),
    (FileNotFoundError("d/a347"), True),
    (ValueError("UNAVAILABLE: connection reset"), False),
    (ValueError("PERMISSION_DENIED: bucket"), False),
    (PermissionError(13, "Permission denied"), False),
    (TimeoutError("read timed out"), False),
    (OSError(5, "Input/output error"), False),
    (RuntimeError("something else"), False),
])
def test_only_evidence_of_damage_counts_as_damage(error, damage):
  assert checkpoints.is_damage(error) is damage


def _flaky_restore(checkpointer, errors):
  """Makes the manager's restore raise `errors` in turn, then work; returns the call log."""
  real, calls = checkpointer._manager.restore, []

  def restore(step, *args, **kwargs):
    calls.append(step)
    if errors:
      raise errors.pop(0)
    return real(step, *args, **kwargs)

  checkpointer._manager.restore = restore
  return calls


def test_a_read_that_fails_for_a_while_is_retried_not_rewound(setting, saved, tmp_path,
                                                              monkeypatch):
  mesh, rules, abstract, states = setting
  monkeypatch.setattr(checkpoints, "_RETRY_SECONDS", 0.0)
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(saved, directory)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    checkpointer = checkpoints.Checkpointer(directory, keep=KEEP)
    calls = _flaky_restore(checkpointer, [TimeoutError("slow disk"),
                                          ValueError("UNAVAILABLE: try again")])
    try:
      state, position = checkpointer.restore_newest(abstract)
    finally:
      checkpointer.close()
  assert calls == [STEPS[-1]] * 3 and position["step"] == STEPS[-1]
  _assert_same_state(state, states[STEPS[-1]], abstract)


def test_a_read_that_keeps_failing_stops_and_leaves_every_checkpoint(setting, saved, tmp_path,
                                                                     monkeypatch):
  mesh, rules, abstract, _ = setting
  monkeypatch.setattr(checkpoints, "_RETRY_SECONDS", 0.0)
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(saved, directory)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    checkpointer = checkpoints.Checkpointer(directory, keep=KEEP)
    calls = _flaky_restore(checkpointer, [PermissionError(13, "Permission denied")] * 5)
    try:
      with pytest.raises(UserError, match=f"step {STEPS[-1]}.*could not be read.*not fall back"):
        checkpointer.restore_newest(abstract)
    finally:
      checkpointer.close()
  assert calls == [STEPS[-1]] * checkpoints._RESTORE_ATTEMPTS  # Never an older step.
  assert sorted(os.listdir(directory)) == sorted(str(s) for s in STEPS[-KEEP:])
