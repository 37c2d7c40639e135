"""Causal LM: the causal view by perturbation and by gradients, its targets, its limits."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxlm.data.tokenizer import PAD_ID
from jaxlm.models import ModelConfig, Pretrainer
from jaxlm.models.heads import LmHead
from jaxlm.objectives import DataSpec, build_objectives
from jaxlm.training import inputs
from conftest import experiment_config

# Large initial weights, so that any dependence shows clearly above float noise.
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                     max_position=16, initializer_range=0.2, dropout_rate=0.0,
                     attention_dropout_rate=0.0)
B, L = 2, 12


@pytest.fixture(scope="module")
def causal_model():
  ids = np.random.default_rng(0).integers(5, CONFIG.vocab_size, (B, L)).astype(np.int32)
  batch = {"input_ids": ids, "token_type_ids": np.zeros_like(ids)}
  model = Pretrainer(CONFIG, heads=(("clm", LmHead),), views=(("clm", "causal"),))
  params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, batch, deterministic=True))
  return model, params, batch


def test_a_position_sees_itself_and_the_past_only_perturbation(causal_model):
  model, params, batch = causal_model
  base = np.asarray(model.apply(params, batch, deterministic=True)["clm"])
  assert base.shape == (B, L, CONFIG.vocab_size)
  for j in range(L):
    changed = dict(batch, input_ids=batch["input_ids"].copy())
    changed["input_ids"][:, j] = 5 + (changed["input_ids"][:, j] - 5 + 7) % (CONFIG.vocab_size - 5)
    out = np.asarray(model.apply(params, changed, deterministic=True)["clm"])
    difference = np.abs(out - base).max(axis=(0, 2))  # Per position.
    np.testing.assert_array_equal(difference[:j], 0.0)  # Earlier positions: untouched.
    assert (difference[j:] > 1e-4).all(), (j, difference)  # It and later ones: changed.


def test_a_position_sees_itself_and_the_past_only_gradients(causal_model):
  """Row j of the position table enters the model only at position j: the gradient of
  position i's output with respect to it shows which positions i depends on."""
  model, params, batch = causal_model

  def output_at(position_table, i):
    p = jax.tree_util.tree_map(lambda x: x, params)
    p["params"]["encoder"]["embeddings"]["position"] = {"embedding": position_table}
    return model.apply(p, batch, deterministic=True)["clm"][:, i].sum()

  table = params["params"]["encoder"]["embeddings"]["position"]["embedding"]
  for i in range(L):
    grads = jax.grad(output_at)(table, i)
    norms = np.asarray(jnp.abs(grads).sum(axis=1))[:L]  # Per input position.
    np.testing.assert_array_equal(norms[i + 1:], 0.0)
    assert (norms[:i + 1] > 0).all(), (i, norms)


def _clm(seq_len=8):
  options = ml_collections.ConfigDict(dict(clm=dict(weight=1.0)))
  spec = DataSpec(vocab_size=64, seq_len=seq_len, word_start=np.ones(64, bool))
  return build_objectives(options, spec)[0]


def test_targets_are_the_next_tokens_and_padding_is_never_predicted():
  ids = np.array([[7, 8, 9, 3, 10, PAD_ID, PAD_ID, PAD_ID]], np.int32)
  out = _clm().host_transform({"input_ids": ids}, np.zeros(1, np.uint64))
  np.testing.assert_array_equal(out["clm_ids"][0, :4], [8, 9, 3, 10])
  np.testing.assert_array_equal(out["clm_weights"][0], [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["input_ids"], ids)  # The input is left as it was.


def test_gpt_tiny_batches_hold_text_everywhere(prepared_corpus, tmp_path):
  config = experiment_config("gpt_tiny")
  config.data.train_files = prepared_corpus.directory
  config.model.vocab_size = 512
  _, objectives, train, evals = inputs.build_inputs(config, str(tmp_path), config.model.vocab_size)
  assert [o.name for o in objectives] == ["clm"] and list(evals) == ["windows"]
  batch = train.batch(0)
  assert (batch["input_ids"] != PAD_ID).all()  # packed: every position holds text.
  assert batch["clm_weights"][:, :-1].all() and not batch["clm_weights"][:, -1].any()


def test_mlm_and_clm_each_read_their_own_pass():
  """MLM's pass reads the masked ids, CLM's causal pass the clean ones, with shared weights."""
  from jaxlm.models.heads import MlmHead

  rng = np.random.default_rng(1)
  ids = rng.integers(5, CONFIG.vocab_size, (B, L)).astype(np.int32)
  masked = ids.copy()
  masked[:, 3] = 4  # [MASK]
  batch = {"input_ids": ids, "mlm_input_ids": masked, "token_type_ids": np.zeros_like(ids),
           "mlm_positions": np.full((B, 2), 3, np.int32)}
  model = Pretrainer(CONFIG, heads=(("mlm", MlmHead), ("clm", LmHead)),
                     views=(("clm", "causal"),),
                     bidirectional_input="mlm_input_ids")
  params = nn.meta.unbox(model.init({"params": jax.random.key(0)}, batch, deterministic=True))
  assert set(params["params"]) == {"encoder", "mlm", "clm"}  # One encoder for both passes.
  base = model.apply(params, batch, deterministic=True)

  clean_changed = dict(batch, input_ids=ids.copy())
  clean_changed["input_ids"][:, 3] = 5 + (ids[:, 3] - 5 + 1) % (CONFIG.vocab_size - 5)
  out = model.apply(params, clean_changed, deterministic=True)
  np.testing.assert_array_equal(out["mlm"], base["mlm"])  # MLM never sees the clean token ...
  assert np.abs(out["clm"][:, 3:] - base["clm"][:, 3:]).max() > 1e-4  # ... CLM does.

  masked_changed = dict(batch, mlm_input_ids=masked.copy())
  masked_changed["mlm_input_ids"][:, 5] = 5 + (masked[:, 5] - 5 + 1) % (CONFIG.vocab_size - 5)
  out = model.apply(params, masked_changed, deterministic=True)
  np.testing.assert_array_equal(out["clm"], base["clm"])
  assert np.abs(out["mlm"] - base["mlm"]).max() > 1e-4


def test_bert_tiny_with_clm_added_logs_all_three_losses(tmp_path):
  from jaxlm.training import loop

  config = experiment_config("bert_tiny")
  config.objectives.clm.weight = 1.0
  config.train.steps, config.train.eval_every, config.data.eval_examples = 4, 4, 32
  config.data.batch_size = 16
  last = loop.train_and_evaluate(config, str(tmp_path / "three"))
  for name in ("mlm", "nsp", "clm"):
    assert np.isfinite(last[f"{name}_loss"]) and np.isfinite(last[f"eval/{name}_loss"])
  assert last["loss"] == pytest.approx(last["mlm_loss"] + last["nsp_loss"] + last["clm_loss"],
                                       rel=0.05)


def test_gpt_tiny_trains_and_reports_clm(repo_root, tmp_path):
  from jaxlm.training import loop
  from jaxlm.training.metrics import read_metrics

  config = experiment_config("gpt_tiny")
  config.train.steps, config.train.eval_every, config.data.eval_examples = 30, 30, 32
  config.data.batch_size = 32
  last = loop.train_and_evaluate(config, str(tmp_path / "gpt"))
  rows = [r for r in read_metrics(str(tmp_path / "gpt" / "metrics.jsonl")) if "clm_loss" in r]
  assert rows[-1]["clm_loss"] < rows[0]["clm_loss"] - 0.5, [r["clm_loss"] for r in rows]
  assert "mlm_loss" not in rows[-1] and 0 < last["eval/clm_accuracy"] < 1
  assert last["eval/loss"] == pytest.approx(last["eval/clm_loss"])
  assert last["eval/clm_perplexity"] == pytest.approx(np.exp(last["eval/clm_loss"]))
