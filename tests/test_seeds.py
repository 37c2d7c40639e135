"""Seeds apart and honest accounting: what each seed moves, that arms differing only in their
objectives share their encoder and eval set, and the cumulative counts in metrics.jsonl."""

import jax
import numpy as np
import pytest

from jaxlm.models import ModelConfig
from jaxlm.training import flops, inputs, loop
from jaxlm.training.metrics import read_metrics
from conftest import experiment_config


def _config(**changes):
  config = experiment_config("bert_tiny")
  config.train.steps, config.train.eval_every, config.train.log_every = 1, 1, 1
  config.data.batch_size, config.data.eval_examples = 16, 32
  config.model.dropout_rate = 0.1  # On, so that seeds.dropout has something to move.
  config.optimizer.learning_rate = 1e-12  # One step leaves the initial parameters in place.
  for key, value in changes.items():  # seeds__data=7 sets config.seeds.data.
    *sections, name = key.split("__")
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
  """One step of bert_tiny per arm; returns its merged metrics row of step 1."""
  base = tmp_path_factory.mktemp("arms")
  changes = {
      "base": {},
      "init": {"seeds__init": 7},
      "no_nsp": {"objectives__nsp__weight": 0.0},
  }
  rows = {}
  for name, change in changes.items():
    loop.train_and_evaluate(_config(**change), str(base / name))
    rows[name] = read_metrics(str(base / name / "metrics.jsonl"))[-1]
  return rows


def test_arms_differing_in_objectives_share_init_and_eval_set(arms):
  """The acceptance check: MLM + NSP and MLM alone, one step at lr 1e-12, the same seeds: the
  same eval MLM loss (same encoder and MLM head init, same eval windows and masks)."""
  base = arms["base"]
  assert arms["no_nsp"]["eval/mlm_loss"] == pytest.approx(base["eval/mlm_loss"], rel=1e-5)
  assert abs(arms["init"]["eval/mlm_loss"] - base["eval/mlm_loss"]) > 1e-3  # It can differ.


def test_each_seed_moves_only_its_own_key():
  def keys(**changes):
    return [jax.random.key_data(k) for k in loop.seed_keys(_config(**changes))]

  init, dropout = keys()
  for changes, moved in (({"seeds__dropout": 7}, (False, True)),
                         ({"seeds__data": 7}, (False, False)),
                         ({"seeds__init": 7}, (True, False)),
                         ({"seeds__init": 0}, (False, False))):  # train.seed is 0: the same.
    new_init, new_dropout = keys(**changes)
    assert (not np.array_equal(new_init, init), not np.array_equal(new_dropout, dropout)) == moved


def test_dropout_seed_leaves_the_data_alone_and_data_seed_moves_it(tmp_path):
  def first_batch(**changes):
    _, _, train, _ = inputs.build_inputs(_config(**changes), str(tmp_path), 128)
    return train.batch(0)

  base = first_batch()
  for key, value in first_batch(seeds__dropout=7).items():
    np.testing.assert_array_equal(value, base[key])
  other = first_batch(seeds__data=7)
  assert not np.array_equal(other["input_ids"], base["input_ids"])


def test_encoder_parameters_do_not_depend_on_the_heads():
  import flax.linen as nn
  import jax

  from jaxlm.models import Pretrainer
  from jaxlm.models.heads import LmHead, MlmHead, NspHead, PlmHead

  config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                       max_position=16)
  ids = np.random.default_rng(0).integers(5, 64, (2, 12)).astype(np.int32)
  batch = {"input_ids": ids, "token_type_ids": np.zeros_like(ids),
           "mlm_positions": np.zeros((2, 2), np.int32),
           "plm_perm": np.tile(np.arange(12, dtype=np.int32), (2, 1)),
           "plm_target_weights": np.ones((2, 2), np.float32)}
  encoders = []
  for heads, views in (((("mlm", MlmHead), ("nsp", NspHead)), ()),
                       ((("mlm", MlmHead),), ()),
                       ((("clm", LmHead),), (("clm", "causal"),)),
                       ((("plm", PlmHead),), (("plm", "permuted"),))):
    params = nn.meta.unbox(Pretrainer(config, heads=heads, views=views).init(
        jax.random.key(3), batch, deterministic=True))
    encoder = dict(params["params"]["encoder"])
    encoder.pop("query_start", None)  # PLM's own parameter.
    encoders.append(encoder)
  for other in encoders[1:]:
    jax.tree_util.tree_map(np.testing.assert_array_equal, other, encoders[0])


def test_cumulative_counts_equal_a_hand_count_and_survive_a_resume(tmp_path):
  def run(workdir, steps):
    config = _config(train__steps=steps, train__checkpoint_every=2)
    config.objectives.plm.weight = 1.0
    config.optimizer.learning_rate = 1e-3
    loop.train_and_evaluate(config, workdir)
    return config, read_metrics(f"{workdir}/metrics.jsonl")

  run(str(tmp_path / "run"), 2)
  config, rows = run(str(tmp_path / "run"), 4)  # Resumed at step 2.

  _, objectives, train, _ = inputs.build_inputs(config, str(tmp_path / "run"), 128)
  batches = [train.batch(step) for step in range(4)]
  tokens_per_step = config.data.batch_size * config.data.seq_len
  hand = sum(float(b["mlm_weights"].sum() + b["plm_target_weights"].sum()) for b in batches)
  last = rows[-1]
  assert last["predicted_tokens"] == pytest.approx(hand, rel=1e-9)
  assert last["tokens_seen"] == 4 * tokens_per_step
  per_token = flops.training_flops_per_token(ModelConfig.from_config(config.model),
                                             config.data.seq_len, objectives)
  assert last["model_flops"] == pytest.approx(4 * tokens_per_step * per_token, rel=1e-9)
  text = sum(float((b["input_ids"] >= 5).sum()) for b in batches[3:])
  assert last["mlm_mask_rate"] == pytest.approx(batches[3]["mlm_weights"].sum() / text, rel=1e-6)
  assert last["mlm_predicted_per_step"] == pytest.approx(batches[3]["mlm_weights"].sum())
  labels = batches[3]["next_sentence_label"]
  assert last["nsp_random_next_share"] == pytest.approx((labels == 1).mean())
  assert 1.0 <= last["plm_span_length"] < 1.5  # Single-piece targets: runs are short.
