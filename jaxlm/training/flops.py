"""Model FLOPs per token and device peaks, for MFU (model FLOPs utilisation)."""

from collections.abc import Sequence

import jax

from jaxlm.models import ModelConfig
from jaxlm.objectives import Objective

# Dense peak FLOP/s per device in the usual training precision (bf16 on accelerators).
_PEAKS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e ("TPU v5 lite")
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)
# A 2-core x86 host measured about 189 GFLOP/s for a large float32 matmul; the CPU figure is a
# rough guide only, shared by all simulated CPU devices of the host.
_CPU_HOST_PEAK = 189e9


def peak_flops_per_device(override_tflops: float = 0.0) -> float:
  if override_tflops > 0:
    return override_tflops * 1e12
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    return _CPU_HOST_PEAK / jax.local_device_count()
  for name, peak in _PEAKS:
    if name.lower() in device.device_kind.lower():
      return peak
  return 0.0


def encoder_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward = 3 x forward) per input token of the encoder.

  6 x matmul parameters of the layers, plus attention scores and values (12 x layers x hidden
  x seq). Relative attention adds, per layer, the projection of 2 x seq offset encodings and
  each query's scores against them. Heads add their own (`Objective.flops_per_token`).
  """
  d, f, n = config.hidden_size, config.mlp_dim, config.num_layers
  flops = 6 * n * (4 * d * d + 2 * d * f) + 12 * n * d * seq_len
  if config.position_encoding == "relative":
    flops += 6 * n * (2 * d * d + 2 * d * seq_len)
  return float(flops)


def training_flops_per_token(config: ModelConfig, seq_len: int,
                             objectives: Sequence[Objective]) -> float:
  """A step's training FLOPs per input token: one encoder pass per view the enabled objectives
  need, plus each objective's head and view-specific work (PLM's query stream)."""
  passes = len({o.view for o in objectives if o.head})
  return passes * encoder_flops_per_token(config, seq_len) + sum(
      o.flops_per_token(config) for o in objectives)
