"""Trainer options of issue 12: `train.profile_steps` (a jax.profiler trace of a few steps in the
workdir) and `train.prng_impl` (the generator of dropout's random bits), whose numbers must not
depend on the mesh either.

The mesh comparisons need 8 simulated CPU devices (tests/conftest.py asks for them).
"""

import dataclasses
import functools
import glob
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import base, optimizers
from jaxlm import config as config_lib
from jaxlm.errors import UserError
from jaxlm.models import MlmHead, ModelConfig, NspHead, Pretrainer
from jaxlm.objectives import DataSpec, build_objectives
from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib
from jaxlm.training import loop, optimizer, state as state_lib, step as step_lib
from jaxlm.training.metrics import read_metrics
from conftest import TOKENIZER_VOCAB, experiment_config

IMPLS = ("threefry", "rbg", "unsafe_rbg")


# ---- profile_steps ----

def _train_config(**train):
  config = base.get_config()
  config.train.steps = 10
  config.train.update(train)
  return config


@pytest.mark.parametrize("value", ["3,2", "0,2", "2,11", "2", "a,b", "1,2,3"])
def test_bad_profile_steps_are_refused(value):
  with pytest.raises(UserError, match=r"profile_steps is .*1 <= A <= B <= train.steps \(10\)"):
    config_lib.validate(_train_config(profile_steps=value))


@pytest.mark.parametrize("value, want", [("", None), ("1,10", (1, 10)), (" 4, 4 ", (4, 4))])
def test_profile_steps_parse(value, want):
  config = _train_config(profile_steps=value)
  config_lib.validate(config)
  assert config_lib.profile_range(config.train) == want


def test_unknown_prng_impl_is_refused():
  with pytest.raises(UserError, match="train.prng_impl is 'philox'.*'threefry', 'rbg'"):
    config_lib.validate(_train_config(prng_impl="philox"))


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory, prepared_corpus):
  """A 4-step bert_tiny run on the prepared corpus, dropout on, rbg bits, steps 2..3 traced."""
  config = experiment_config("bert_tiny")
  config.train.update(steps=4, log_every=1, eval_every=4, checkpoint_every=4,
                      profile_steps="2,3", prng_impl="rbg")
  config.data.update(train_files=prepared_corpus.directory, batch_size=16, seq_len=32,
                     eval_examples=16)
  config.model.update(vocab_size=TOKENIZER_VOCAB, max_position=32, dropout_rate=0.1)
  workdir = str(tmp_path_factory.mktemp("profiled") / "run")
  loop.train_and_evaluate(config, workdir)
  return workdir


def test_profile_steps_write_a_trace_into_the_workdir(profiled_run):
  traces = glob.glob(os.path.join(profiled_run, "profile", "**", "*.xplane.pb"), recursive=True)
  assert traces and all(os.path.getsize(t) > 0 for t in traces), os.listdir(profiled_run)


def test_rbg_run_trains_and_logs_finite_losses(profiled_run):
  rows = [r for r in read_metrics(os.path.join(profiled_run, "metrics.jsonl")) if "loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert os.path.isdir(os.path.join(profiled_run, "checkpoints", "4"))


# ---- prng_impl: the same numbers on every mesh ----

# Every dimension a rule may split divides by 8 (as in tests/test_mesh.py); dropout on, both kinds.
MODEL = ModelConfig(vocab_size=128, hidden_size=64, num_layers=1, num_heads=8, mlp_dim=256,
                    max_position=16, dropout_rate=0.1, attention_dropout_rate=0.1)
ROWS, LENGTH, PREDICTIONS = 8, 16, 3
STEPS = 3


def _batch():
  rng = np.random.default_rng(0)
  return {
      "input_ids": rng.integers(5, 128, (ROWS, LENGTH)).astype(np.int32),
      "token_type_ids": np.zeros((ROWS, LENGTH), np.int32),
      "mlm_positions": np.tile(np.arange(1, PREDICTIONS + 1, dtype=np.int32), (ROWS, 1)),
      "mlm_ids": rng.integers(5, 128, (ROWS, PREDICTIONS)).astype(np.int32),
      "mlm_weights": np.ones((ROWS, PREDICTIONS), np.float32),
      "next_sentence_label": rng.integers(0, 2, ROWS).astype(np.int32),
  }


def _losses(impl: str, mesh_sizes: tuple[int, int, int], devices,
            model_config: ModelConfig = MODEL) -> list[float]:
  """Losses of STEPS train steps of the real step on this mesh, dropout from `impl`'s key."""
  config = _train_config(prng_impl=impl)
  _, dropout_rng = loop.seed_keys(config)
  data, fsdp, tensor = mesh_sizes
  mesh_config = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=""))
  mesh = mesh_lib.make_mesh(mesh_config, devices=devices)
  rules = rules_lib.rules_from_config(mesh_config)
  spec = DataSpec(vocab_size=128, seq_len=LENGTH, word_start=np.ones(128, bool))
  objectives = build_objectives(ml_collections.ConfigDict(dict(
      mlm=dict(base.get_config().objectives.mlm, max_predictions_per_seq=PREDICTIONS),
      nsp=dict(base.get_config().objectives.nsp))), spec)
  model = Pretrainer(model_config, heads=(("mlm", MlmHead), ("nsp", NspHead)))
  tx, schedule = optimizer.make_optimizer(optimizers.adamw_bert(1e-3, 0), 10)
  host = _batch()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = state_lib.abstract_state(model, tx, host, mesh, rules)
    state = state_lib.init_state(jax.random.key(0), model, tx, host, shardings)
    batch_sharding, replicated = rules_lib.batch_sharding(mesh, rules), rules_lib.replicated(mesh)
    step = jax.jit(functools.partial(step_lib.train_step, model=model, objectives=objectives,
                                     tx=tx, schedule=schedule),
                   in_shardings=(shardings, batch_sharding, replicated, None),
                   out_shardings=(shardings, replicated), donate_argnums=0)
    batch = {k: jax.device_put(v, batch_sharding) for k, v in host.items()}
    dropout_rng = jax.device_put(dropout_rng, replicated)
    losses = []
    for _ in range(STEPS):
      state, metrics = step(state, batch, dropout_rng, None)
      losses.append(float(metrics["loss"]))
  return losses


@pytest.fixture(scope="module")
def eight_devices():
  devices = jax.devices("cpu")
  assert len(devices) >= 8, "Set XLA_FLAGS=--xla_force_host_platform_device_count=8."
  return devices[:8]


@pytest.fixture(scope="module")
def one_device_losses(eight_devices):
  return {impl: _losses(impl, (1, 1, 1), eight_devices[:1]) for impl in IMPLS}


def test_each_generator_trains_deterministically(one_device_losses, eight_devices):
  for impl, losses in one_device_losses.items():
    assert all(np.isfinite(losses)), (impl, losses)
  # Run again from scratch: the very same numbers.
  assert _losses("rbg", (1, 1, 1), eight_devices[:1]) == one_device_losses["rbg"]


def test_rbg_draws_other_dropout_masks_than_threefry(one_device_losses):
  """Same parameters and batch at step 1: only the dropout masks differ."""
  first = {impl: losses[0] for impl, losses in one_device_losses.items()}
  assert abs(first["rbg"] - first["threefry"]) > 1e-4, first
  assert abs(first["unsafe_rbg"] - first["threefry"]) > 1e-4, first


# threefry's independence of the mesh is tested on whole runs (tests/test_parallel_e2e.py).
@pytest.mark.parametrize("impl, mesh_sizes", [("rbg", (8, 1, 1)), ("rbg", (2, 2, 2)),
                                              ("unsafe_rbg", (2, 2, 2))],
                         ids=["rbg-data8", "rbg-d2_f2_t2", "unsafe_rbg-d2_f2_t2"])
def test_same_losses_on_8_devices_as_on_one(impl, mesh_sizes, one_device_losses, eight_devices):
  """The 2 x 2 x 2 mesh splits the batch over data and fsdp and the heads and MLP over tensor:
  every dropout mask is drawn sharded."""
  got = _losses(impl, mesh_sizes, eight_devices)
  np.testing.assert_allclose(got, one_device_losses[impl], rtol=2e-4)


def test_seed_keys_keep_init_on_threefry():
  init_threefry, dropout_threefry = loop.seed_keys(_train_config())
  init_rbg, dropout_rbg = loop.seed_keys(_train_config(prng_impl="rbg"))
  np.testing.assert_array_equal(jax.random.key_data(init_rbg), jax.random.key_data(init_threefry))
  assert str(jax.random.key_impl(dropout_rbg)) == "rbg"
  assert str(jax.random.key_impl(dropout_threefry)) == "threefry2x32"


def test_xla_attention_on_a_sharded_mesh_matches_einsum_on_one_device(eight_devices):
  """`model.attention_impl=xla` with heads split over `tensor` and the batch over data and fsdp
  (hidden dropout on; attention dropout off, which xla lacks)."""
  einsum = dataclasses.replace(MODEL, attention_dropout_rate=0.0)
  want = _losses("threefry", (1, 1, 1), eight_devices[:1], einsum)
  got = _losses("threefry", (2, 2, 2), eight_devices,
                dataclasses.replace(einsum, attention_impl="xla"))
  np.testing.assert_allclose(got, want, rtol=2e-4)
