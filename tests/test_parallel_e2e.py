"""The numbers do not depend on the mesh: the same losses (MLM, NSP and PLM), with dropout on, on
one device, on data / fsdp / tensor meshes of 8 devices, on two processes of 4 devices, and after
resuming a checkpoint onto another mesh.

The one-device and two-process runs are `python -m jaxlm.train` subprocesses (a process's device
count is fixed when JAX starts); the 8-device meshes run in this process (tests/conftest.py asks
for 8 simulated CPU devices).
"""

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.data.permutation import num_target_slots
from jaxlm.models import MlmHead, ModelConfig, NspHead, Pretrainer
from jaxlm.models.heads import PlmHead
from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib
from jaxlm.training import checkpoints, loop, optimizer, state as state_lib
from jaxlm.training.metrics import read_metrics

STEPS = 6
RTOL = 2e-4  # Relative; float32 sums in another order differ by about 1e-7.
TIMEOUT_S = 240  # For each group of processes started together.
COMPARED = ("loss", "mlm_loss", "nsp_loss", "plm_loss", "grad_norm")
DEVICES_FLAG = "--xla_force_host_platform_device_count"
# Small settings, and dropout on (bert_tiny turns it off): its masks must not depend on the mesh.
OVERRIDES = {
    "train.steps": STEPS,
    "train.log_every": 1,
    "train.eval_every": STEPS,
    "train.checkpoint_every": STEPS,
    "data.eval_examples": 16,
    "data.batch_size": 32,
    "model.dropout_rate": 0.1,
    "model.attention_dropout_rate": 0.1,
    # MLM + NSP + PLM: the permuted view's gathers and constant masks must not depend on the
    # mesh either.
    "objectives.plm.weight": 1.0,
}
# The runs are shorter than bert_tiny's warm-up (20 steps), so the learning rate of a step does
# not depend on train.steps: a 4-step run is the start of a 6-step one.


def _tiny_config(repo_root, **overrides):
  """experiments/bert_tiny.py with OVERRIDES, then `overrides` (train__steps=4 sets train.steps)."""
  spec = importlib.util.spec_from_file_location(
      "bert_tiny", os.path.join(repo_root, "experiments", "bert_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  overrides = {k.replace("__", "."): v for k, v in overrides.items()}
  for key, value in {**OVERRIDES, **overrides}.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config


def _cli_args(workdir, **overrides):
  args = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  args += [f"--config.{k.replace('__', '.')}={v}" for k, v in overrides.items()]
  return [sys.executable, "-m", "jaxlm.train", "--config=experiments/bert_tiny.py",
          f"--workdir={workdir}", *args]


def _env(devices):
  """This environment with XLA_FLAGS asking for `devices` CPU devices (and no other count)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICES_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICES_FLAG}={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _tail(path, chars=3000):
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()[-chars:]


def _run_processes(repo_root, logdir, commands, devices):
  """Runs the commands together (each with `devices` CPU devices); fails with their stderr."""
  procs = []
  for i, command in enumerate(commands):
    out = open(os.path.join(logdir, f"proc{i}.stdout"), "w", encoding="utf-8")
    err = open(os.path.join(logdir, f"proc{i}.stderr"), "w", encoding="utf-8")
    procs.append((subprocess.Popen(command, cwd=repo_root, env=_env(devices), stdout=out,
                                   stderr=err, stdin=subprocess.DEVNULL), out, err))
  deadline = time.monotonic() + TIMEOUT_S
  timed_out = False
  try:
    # Until all are done, one fails (its peers would wait for it forever) or time runs out.
    while any(proc.poll() is None for proc, _, _ in procs):
      if any(proc.poll() not in (None, 0) for proc, _, _ in procs):
        break
      if time.monotonic() > deadline:
        timed_out = True
        break
      time.sleep(0.2)
  finally:
    for proc, out, err in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      out.close()
      err.close()
  failed = timed_out or any(proc.returncode != 0 for proc, _, _ in procs)
  if failed:
    report = "\n".join(
        f"--- process {i} (exit {proc.returncode}), stderr tail:\n{_tail(err.name)}"
        for i, (proc, _, err) in enumerate(procs))
    what = f"timed out after {TIMEOUT_S} s" if timed_out else "failed"
    pytest.fail(f"{len(commands)} process(es) {what}:\n{report}")


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train_rows(workdir):
  return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]


def _assert_same_numbers(got_rows, want_rows, what):
  assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows], what
  for got, want in zip(got_rows, want_rows):
    assert got["learning_rate"] == pytest.approx(want["learning_rate"], rel=1e-6, abs=1e-12)
    for key in COMPARED:
      assert got[key] == pytest.approx(want[key], rel=RTOL), (
          f"{what}: {key} at step {got['step']} is {got[key]!r}, one device gave {want[key]!r}; "
          f"losses {[r['loss'] for r in got_rows]} vs {[r['loss'] for r in want_rows]}")


@dataclasses.dataclass
class Reference:
  workdir: str
  tokenizer: str  # Trained by this run; every other run reuses it.
  rows: list  # Train rows of metrics.jsonl, one per step.
  eval_loss: float


@pytest.fixture(scope="module")
def reference(repo_root, tmp_path_factory):
  """The uninterrupted 6-step run on one device, in a subprocess."""
  base = tmp_path_factory.mktemp("one_device")
  workdir = str(base / "run")
  _run_processes(repo_root, str(base), [_cli_args(workdir)], devices=1)
  rows = _train_rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  eval_loss = read_metrics(os.path.join(workdir, "metrics.jsonl"))[-1]["eval/loss"]
  return Reference(workdir, os.path.join(workdir, "tokenizer.model"), rows, eval_loss)


@pytest.fixture(scope="module")
def eight_devices():
  devices = jax.devices()
  assert len(devices) == 8 and devices[0].platform == "cpu", (
      f"These tests need 8 CPU devices but JAX has {devices}. Set "
      f"XLA_FLAGS={DEVICES_FLAG}=8 before starting pytest.")
  return devices


def _mesh_overrides(data, fsdp, tensor):
  return {"mesh__data": data, "mesh__fsdp": fsdp, "mesh__tensor": tensor}


def _train_in_process(repo_root, reference, workdir, caplog, mesh, **overrides):
  config = _tiny_config(repo_root, **_mesh_overrides(*mesh), data__tokenizer=reference.tokenizer,
                        **overrides)
  with caplog.at_level(logging.INFO):
    last = loop.train_and_evaluate(config, workdir)
  data, fsdp, tensor = mesh
  messages = "\n".join(r.getMessage() for r in caplog.records)
  assert f"mesh {{'data': {data}, 'fsdp': {fsdp}, 'tensor': {tensor}}}" in messages, messages
  return last, messages


def test_reference_run(reference):
  with open(os.path.join(reference.workdir, "config.json"), encoding="utf-8") as f:
    written = json.load(f)
  assert written["model"]["dropout_rate"] == 0.1
  assert written["model"]["attention_dropout_rate"] == 0.1
  losses = [r["loss"] for r in reference.rows]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 8, 1), (2, 2, 2)],
                         ids=["data8", "fsdp8", "data2_fsdp2_tensor2"])
def test_same_losses_on_8_device_meshes(repo_root, reference, eight_devices, tmp_path, caplog,
                                        mesh):
  workdir = str(tmp_path / "run")
  last, _ = _train_in_process(repo_root, reference, workdir, caplog, mesh)
  _assert_same_numbers(_train_rows(workdir), reference.rows, f"mesh {mesh}")
  assert last["eval/loss"] == pytest.approx(reference.eval_loss, rel=RTOL)


def test_same_losses_on_two_processes(repo_root, reference, tmp_path):
  """2 processes x 4 devices, mesh data=2 x fsdp=4: each process feeds half of every batch."""
  workdir = str(tmp_path / "run")
  port = _free_port()
  commands = [
      _cli_args(workdir, data__tokenizer=reference.tokenizer, **_mesh_overrides(2, 4, 1)) + [
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
      for i in range(2)
  ]
  _run_processes(repo_root, str(tmp_path), commands, devices=4)
  _assert_same_numbers(_train_rows(workdir), reference.rows, "2 processes x 4 devices")
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  assert rows[-1]["eval/loss"] == pytest.approx(reference.eval_loss, rel=RTOL)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS)))


@dataclasses.dataclass
class Interrupted:
  workdir: str
  rows: list  # Its metrics.jsonl rows, steps 1-4.
  saved: str  # A copy of its checkpoints/ folder, as the fsdp=8 run left it.


@pytest.fixture(scope="module")
def interrupted(repo_root, reference, eight_devices, tmp_path_factory):
  """4 of the 6 steps on mesh fsdp=8, checkpointed every 2 steps."""
  base = tmp_path_factory.mktemp("interrupted")
  workdir = str(base / "run")
  config = _tiny_config(repo_root, **_mesh_overrides(1, 8, 1), data__tokenizer=reference.tokenizer,
                        train__steps=4, train__checkpoint_every=2)
  loop.train_and_evaluate(config, workdir)
  saved = str(base / "saved_checkpoints")
  shutil.copytree(os.path.join(workdir, "checkpoints"), saved)
  assert sorted(int(s) for s in os.listdir(saved) if s.isdigit()) == [2, 4]
  return Interrupted(workdir, read_metrics(os.path.join(workdir, "metrics.jsonl")), saved)


def test_resume_onto_another_mesh(repo_root, reference, interrupted, caplog):
  """The fsdp=8 checkpoint of step 4, resumed on data=2 x fsdp=2 x tensor=2 to step 6."""
  _train_in_process(repo_root, reference, interrupted.workdir, caplog, (2, 2, 2))
  assert "Resumed from the checkpoint at step 4" in caplog.text
  rows = read_metrics(os.path.join(interrupted.workdir, "metrics.jsonl"))
  # Steps 1-4 are the interrupted run's rows, untouched: training went on, it did not restart.
  assert rows[:4] == interrupted.rows[:4] and [r["step"] for r in rows] == list(range(1, 7))
  _assert_same_numbers(_train_rows(interrupted.workdir)[:4], reference.rows[:4], "fsdp=8")
  _assert_same_numbers(_train_rows(interrupted.workdir)[4:], reference.rows[4:],
                       "resumed on data=2 x fsdp=2 x tensor=2")
  assert rows[-1]["eval/loss"] == pytest.approx(reference.eval_loss, rel=RTOL)


def _restore(repo_root, directory, devices, mesh):
  """The newest checkpoint in `directory`, restored onto `mesh` as the loop does it."""
  config = _tiny_config(repo_root)
  mesh = mesh_lib.make_mesh(_mesh_config(config, *mesh), devices=devices)
  rules = rules_lib.rules_from_config(config.mesh)
  model = Pretrainer(ModelConfig.from_config(config.model),
                     heads=(("mlm", MlmHead), ("nsp", NspHead), ("plm", PlmHead)),
                     views=(("plm", "permuted"),))
  tx, _ = optimizer.make_optimizer(config.optimizer, STEPS)
  seq_len, predictions = config.data.seq_len, config.objectives.mlm.max_predictions_per_seq
  targets = num_target_slots(seq_len, config.objectives.plm.partial_prediction)
  batch = {
      "input_ids": jax.ShapeDtypeStruct((1, seq_len), jnp.int32),
      "token_type_ids": jax.ShapeDtypeStruct((1, seq_len), jnp.int32),
      "mlm_positions": jax.ShapeDtypeStruct((1, predictions), jnp.int32),
      "plm_perm": jax.ShapeDtypeStruct((1, seq_len), jnp.int32),
      "plm_target_weights": jax.ShapeDtypeStruct((1, targets), jnp.float32),
  }
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, _ = state_lib.abstract_state(model, tx, batch, mesh, rules)
    checkpointer = checkpoints.Checkpointer(directory, keep=3)
    try:
      state, position = checkpointer.restore_newest(abstract)
    finally:
      checkpointer.close()
  return abstract, state, position


def _mesh_config(config, data, fsdp, tensor):
  mesh = config.mesh.copy_and_resolve_references()
  mesh.data, mesh.fsdp, mesh.tensor = data, fsdp, tensor
  return mesh


def _spec(array):
  """A PartitionSpec as a tuple, with axes of size-1 tuples unwrapped and trailing None cut."""
  spec = [a[0] if isinstance(a, tuple) and len(a) == 1 else a for a in array.sharding.spec]
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


def test_checkpoint_restores_sharded_for_the_new_mesh(repo_root, interrupted, eight_devices):
  abstract, state, position = _restore(repo_root, interrupted.saved, eight_devices, (2, 2, 2))
  assert position["step"] == 4 and int(state.step) == 4
  layer = state.params["encoder"]["layer_0"]
  kernel = layer["mlp"]["wi"]["kernel"]  # ('embed', 'mlp').
  assert _spec(kernel) == ("fsdp", "tensor")
  assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  rows, cols = kernel.shape
  assert {s.data.shape for s in kernel.addressable_shards} == {(rows // 2, cols // 2)}
  assert _spec(layer["mlp"]["wo"]["kernel"]) == ("tensor", "fsdp")
  for leaf, target in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(abstract)):
    assert leaf.sharding == target.sharding
  # The same numbers as restored onto the mesh it was saved from.
  _, saved_state, _ = _restore(repo_root, interrupted.saved, eight_devices, (1, 8, 1))
  saved_kernel = saved_state.params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"]
  assert {s.data.shape for s in saved_kernel.addressable_shards} == {(rows // 8, cols)}
  for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(saved_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _restore_processes(repo_root, tmp_path, directory, mode, faults=("", "")):
  """The two processes of tests/restore_worker.py; returns each one's printed JSON."""
  port = _free_port()
  logdir = tmp_path / f"{mode}{''.join(faults)}"
  logdir.mkdir()
  worker = os.path.join(repo_root, "tests", "restore_worker.py")
  commands = [[sys.executable, worker, str(i), str(port), directory, mode,
               *([faults[i]] if faults[i] else [])] for i in range(2)]
  _run_processes(repo_root, str(logdir), commands, devices=1)
  outputs = []
  for i in range(2):
    with open(logdir / f"proc{i}.stdout", encoding="utf-8") as f:
      outputs.append(json.loads(f.read().strip().splitlines()[-1]))
  return outputs


def test_processes_agree_on_the_checkpoint_they_restore(repo_root, tmp_path):
  """One process finds the newest checkpoint damaged: both resume from the older one. One
  process cannot read it (no sign of damage): both stop, and nothing is rewound."""
  saved = str(tmp_path / "saved")
  assert _restore_processes(repo_root, tmp_path, saved, "save") == [{"saved": [1, 2]}] * 2

  damaged = str(tmp_path / "damaged")
  shutil.copytree(saved, damaged)
  got = _restore_processes(repo_root, tmp_path, damaged, "restore", faults=("", "damaged"))
  assert got == [{"step": 1, "value": 1.0}] * 2

  unreadable = str(tmp_path / "unreadable")
  shutil.copytree(saved, unreadable)
  got = _restore_processes(repo_root, tmp_path, unreadable, "restore",
                           faults=("", "unreadable"))
  assert all("step 2" in g["error"] and "could not be read" in g["error"] for g in got), got
  assert sorted(os.listdir(unreadable)) == ["1", "2"]

  clean = str(tmp_path / "clean")
  shutil.copytree(saved, clean)
  assert _restore_processes(repo_root, tmp_path, clean, "restore") == [
      {"step": 2, "value": 2.0}] * 2
