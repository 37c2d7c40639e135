"""`python -m jaxlm.bench`'s train-step benchmark, the measured CPU peak, and the model FLOPs of
each objective against a count by hand."""

import json

import ml_collections
import numpy as np
import pytest

from jaxlm.models import ModelConfig
from jaxlm.objectives import DataSpec, build_objectives
from jaxlm.training import flops

# A tiny encoder: d 16, f 64, 2 layers, vocabulary 100, 16 positions.
D, F, N, V, L = 16, 64, 2, 100, 16
# Encoder pass, per token: 6 x (2 layers x (4 d^2 + 2 d f)) = 36,864 for the matrix products,
# 12 x 2 layers x d x L = 6,144 for attention scores and values.
ENCODER = 36_864 + 6_144
# BERT's transform + tied projection at one position, trained: 6 x (d V + d^2) = 11,136.
LM_HEAD = 11_136


def _tiny(names, **options):
  from configs import base

  config = ModelConfig(vocab_size=V, hidden_size=D, num_layers=N, num_heads=2, mlp_dim=F,
                       max_position=L, dropout_rate=0.0, attention_dropout_rate=0.0)
  defaults = base.get_config().objectives
  chosen = ml_collections.ConfigDict(
      {n: dict(defaults[n], weight=1.0, **options.get(n, {})) for n in names})
  return config, build_objectives(chosen, DataSpec(V, L, np.ones(V, bool)))


def test_encoder_flops_by_hand():
  config, _ = _tiny(("mlm",))
  assert flops.encoder_flops_per_token(config, L) == ENCODER


def test_mlm_flops_count_the_predictions_made():
  config, objectives = _tiny(("mlm",))  # mask_rate 0.15, max_predictions_per_seq 20.
  # Measured: 2.5 predictions per 16-token row -> 11,136 x 2.5 / 16 = 1,740 per token.
  assert flops.training_flops_per_token(config, L, objectives, {"mlm": 2.5}) == ENCODER + 1_740
  # Expected without a measure: round(0.15 x 14 text tokens) = 2, never the 20 slots: 1,392.
  assert flops.training_flops_per_token(config, L, objectives) == ENCODER + 1_392


def test_nsp_flops_by_hand():
  config, objectives = _tiny(("nsp",))
  # The pooler (d^2) and the classifier (2 d) at [CLS], once per 16 tokens: 6 x 288 / 16 = 108.
  assert flops.training_flops_per_token(config, L, objectives) == ENCODER + 108


def test_mlm_and_nsp_share_one_pass():
  config, objectives = _tiny(("mlm", "nsp"))
  assert flops.training_flops_per_token(config, L, objectives, {"mlm": 3}) == (
      ENCODER + 11_136 * 3 / 16 + 108)


def test_clm_flops_by_hand():
  config, objectives = _tiny(("clm",))
  assert flops.training_flops_per_token(config, L, objectives) == ENCODER + LM_HEAD
  config, objectives = _tiny(("mlm", "clm"))  # Two views: two encoder passes.
  assert flops.training_flops_per_token(config, L, objectives, {"mlm": 2, "clm": 15}) == (
      2 * ENCODER + 11_136 * 2 / 16 + LM_HEAD)


def test_plm_flops_by_hand():
  config, objectives = _tiny(("plm",))  # partial_prediction 6: P = round(16 / 6) = 3 slots.
  # Per query row: 2 layers x (2 d^2 + 2 d f + 2 L d) = 6,144, plus the head d V + d^2 = 1,856;
  # the content stream's last layer nothing reads: 2 d^2 + 2 d f + 2 L d = 3,072.
  plm = 6 * (3 / 16 * (6_144 + 1_856) - 3_072)
  assert flops.training_flops_per_token(config, L, objectives) == pytest.approx(ENCODER + plm)


def test_measured_peak_is_positive_and_cached(tmp_path, monkeypatch):
  assert flops.measure_matmul_flops(size=256, repeats=2) > 0
  calls = []
  monkeypatch.setattr(flops, "measure_matmul_flops", lambda: calls.append(1) or 5e10)
  cache = str(tmp_path / "peak.json")
  assert flops.host_peak_flops(cache) == 5e10
  assert flops.host_peak_flops(cache) == 5e10 and len(calls) == 1  # Measured once.
  saved = json.load(open(cache))
  assert list(saved.values()) == [5e10] and "XLA_FLAGS=" in next(iter(saved))
  peak, source = flops.peak_flops(cache_file=cache)
  assert peak == 5e10 and "cached" in source
  assert flops.peak_flops(2.0)[0] == pytest.approx(2e12 * flops.jax.device_count())
  # A fresh measurement (bench's) may raise the cached peak, never lower it.
  flops.remember_peak_flops(3e10, cache)
  assert flops.host_peak_flops(cache) == 5e10
  flops.remember_peak_flops(8e10, cache)
  assert flops.host_peak_flops(cache) == 8e10 and len(calls) == 1


def test_step_benchmark_json_has_every_key():
  from jaxlm.training.throughput import step_benchmark
  from configs import recipes

  config = recipes.tiny_fast()
  config.model.update(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, vocab_size=256)
  config.data.update(seq_len=32, batch_size=16)
  result = json.loads(json.dumps(step_benchmark(config, steps=2, warmup=1, matmul_size=256)))
  for key in ("tokens_per_sec", "step_ms", "model_flops_per_token", "mfu", "peak_flops",
              "peak_source", "compile_s", "peak_memory_bytes", "peak_memory_source"):
    assert key in result, key
  assert result["tokens_per_sec"] == pytest.approx(16 * 32 / (result["step_ms"] / 1e3), rel=0.01)
  assert 0 < result["mfu"] < 1.5 and result["peak_flops"] > 0 and result["compile_s"] > 0
  assert result["peak_memory_bytes"] > 2**20 and "measured now" in result["peak_source"]
  # The masking's own count (round(0.15 x 29 text tokens) = 4), not the 20 slots.
  assert result["predictions_per_seq"]["mlm"] == pytest.approx(4.0)
  assert result["model_flops_per_token"] == pytest.approx(
      flops.training_flops_per_token(ModelConfig.from_config(config.model), 32,
                                     _objectives_of(config), {"mlm": 4.0}))


def test_ceiling_times_the_steps_own_matmuls():
  from jaxlm.training.throughput import matmul_flops, step_benchmark
  from configs import recipes

  config = recipes.tiny_fast()
  config.model.update(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, vocab_size=256,
                      scan_layers=True)
  config.data.update(seq_len=32, batch_size=16)
  result = step_benchmark(config, steps=2, warmup=1, matmul_size=256, ceiling=True)
  # By hand, per layer: q, k, v, output (32 x 32 each), the MLP's two 32 x 64, over 512 tokens;
  # scores and context (2 heads x 16 rows x 32 x 32 x 16); forward and two gradients each.
  # Both layers count: the scan's body runs twice.
  tokens = 16 * 32
  layer = 4 * 32 * 32 * tokens + 2 * 32 * 64 * tokens + 2 * 16 * 2 * 32 * 32 * 16
  assert result["matmul_flops_per_step"] >= 2 * 3 * 2 * layer
  assert result["matmuls_per_step"] >= 2 * 3 * 8
  assert result["matmuls_alone_ms"] < result["step_ms"]
  assert result["mfu_ceiling"] > result["mfu"]
  assert matmul_flops((((4, 3, 5), (4, 5, 7)), None, (((2,), (1,)), ((0,), (0,))))) == 2 * 4 * 3 * 5 * 7


def _objectives_of(config):
  return build_objectives(config.objectives,
                          DataSpec(config.model.vocab_size, config.data.seq_len,
                                   np.ones(config.model.vocab_size, bool)), config.eval)
