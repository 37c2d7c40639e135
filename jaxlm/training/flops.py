"""Model FLOPs per token and device peaks, for MFU (model FLOPs utilisation).

MFU = model FLOP/s achieved / the devices' peak. Model FLOPs count the work the model needs,
not what the step happens to spend: matrix products of the encoder passes and of the heads at
the predictions actually made (MLM: its predicted positions, not `max_predictions_per_seq`
slots). The peak is the datasheet's dense bf16 figure on GPU and TPU; on a CPU, where no
datasheet fits, it is measured: a large float32 matrix product timed through XLA on all local
devices together, with the process's XLA flags (`measure_matmul_flops`), cached per host for
the training loop (`host_peak_flops`).
"""

import json
import os
import statistics
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
MATMUL_SIZE = 2048  # The measured CPU peak: a [n, n] @ [n, n] float32 product per device.
CACHE_FILE = os.path.join(os.path.expanduser("~"), ".cache", "jaxlm", "peak_flops.json")


def datasheet_peak_flops(device: jax.Device) -> float:
  """The dense bf16 peak FLOP/s of one accelerator by its kind; 0 when unknown (and on CPU)."""
  if device.platform == "cpu":
    return 0.0
  for name, peak in _PEAKS:
    if name.lower() in device.device_kind.lower():
      return peak
  return 0.0


def measure_matmul_flops(size: int = MATMUL_SIZE, repeats: int = 7) -> float:
  """FLOP/s of this host's local devices together on a jitted float32 matrix product: each
  device multiplies its own [size, size] block by a replicated [size, size] matrix; the median
  of `repeats` synchronised runs after a warm-up. Simulated CPU devices share the host's cores,
  so this is the host's peak however many there are."""
  devices = np.array(jax.local_devices())
  mesh = jax.sharding.Mesh(devices, ("d",))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  numbers = np.random.default_rng(0)
  times = []
  # This process's devices alone, whatever mesh a run has set (on several processes the run's
  # mesh spans devices this process cannot address); inputs made on the host for the same reason.
  with jax.set_mesh(mesh):
    a = jax.device_put(numbers.standard_normal((len(devices) * size, size), np.float32), rows)
    b = jax.device_put(numbers.standard_normal((size, size), np.float32), replicated)
    matmul = jax.jit(jnp.matmul, out_shardings=rows)
    matmul(a, b).block_until_ready()  # Compile and warm up.
    for _ in range(repeats):
      started = time.perf_counter()
      matmul(a, b).block_until_ready()
      times.append(time.perf_counter() - started)
  return 2.0 * len(devices) * size**3 / statistics.median(times)


def _cache_key() -> str:
  device = jax.local_devices()[0]
  return (f"{device.platform}:{device.device_kind}|devices={jax.local_device_count()}"
          f"|jax={jax.__version__}|XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")


def host_peak_flops(cache_file: str = CACHE_FILE) -> float:
  """`measure_matmul_flops` of this host, measured once per device kind, device count, jax
  version and XLA_FLAGS and kept in `cache_file` (a small JSON), so a run does not pay for it."""
  key, cached = _cache_key(), _read_cache(cache_file)
  if isinstance(cached.get(key), (int, float)) and cached[key] > 0:
    return float(cached[key])
  peak = measure_matmul_flops()
  _write_cache(cached, key, peak, cache_file)
  return peak


def remember_peak_flops(measured: float, cache_file: str = CACHE_FILE) -> None:
  """Raises the cached peak to `measured` if that is higher. A peak is the hardware's best: a
  figure taken on a busy machine understates it (and overstates every MFU divided by it), so
  each fresh measurement (`python -m jaxlm.bench` makes two) may only raise the cache."""
  key, cached = _cache_key(), _read_cache(cache_file)
  if not (isinstance(cached.get(key), (int, float)) and cached[key] >= measured):
    _write_cache(cached, key, measured, cache_file)


def _read_cache(cache_file: str) -> dict:
  try:
    with open(cache_file, encoding="utf-8") as f:
      cached = json.load(f)
  except (OSError, ValueError):
    return {}
  return cached if isinstance(cached, dict) else {}


def _write_cache(cached: dict, key: str, peak: float, cache_file: str) -> None:
  cached[key] = peak
  try:
    os.makedirs(os.path.dirname(cache_file), exist_ok=True)
    temporary = f"{cache_file}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
      json.dump(cached, f, indent=1, sort_keys=True)
    os.replace(temporary, cache_file)
  except OSError:
    pass  # A read-only home: measured again next time.


def peak_flops(override_tflops_per_device: float = 0.0, *, measure: bool = False,
               cache_file: str = CACHE_FILE, matmul_size: int = MATMUL_SIZE) -> tuple[float, str]:
  """The peak FLOP/s of every device of the run together, and how it was obtained.

  `override_tflops_per_device` > 0 (`train.peak_tflops_per_device`) wins; then on CPU the
  measured matmul peak of each host (fresh with `measure`, else `host_peak_flops`'s cache)
  times the processes; on GPU/TPU the datasheet peak times the devices; 0 when unknown.
  """
  if override_tflops_per_device > 0:
    return (override_tflops_per_device * 1e12 * jax.device_count(),
            "config: train.peak_tflops_per_device")
  device = jax.local_devices()[0]
  if device.platform == "cpu":
    if measure:
      host = measure_matmul_flops(matmul_size)
      if matmul_size == MATMUL_SIZE:
        remember_peak_flops(host, cache_file)
    else:
      host = host_peak_flops(cache_file)
    how = "measured now" if measure else f"measured, cached in {cache_file}"
    size = matmul_size if measure else MATMUL_SIZE
    return (host * jax.process_count(),
            f"{how}: {size}x{size} float32 matmul per device on {jax.local_device_count()} CPU "
            "device(s) with this process's XLA_FLAGS")
  peak = datasheet_peak_flops(device)
  return (peak * jax.device_count(),
          f"datasheet dense bf16 peak of '{device.device_kind}'" if peak else
          f"unknown device kind '{device.device_kind}': set train.peak_tflops_per_device")


def peak_flops_per_device(override_tflops: float = 0.0) -> float:
  """`peak_flops` (cached measurement on CPU) per device."""
  return peak_flops(override_tflops)[0] / jax.device_count()


def encoder_flops_per_token(config: ModelConfig, seq_len: int, rows_per_step: int = 1) -> float:
  """Training FLOPs (forward + backward = 3 x forward) per input token of the encoder.

  6 x matmul parameters of the layers (a gated MLP has 3 matrices, a plain one 2), plus
  attention scores and values (12 x layers x hidden x seq). Relative attention adds, per layer,
  each query's scores against 2 x seq offsets, and the projection of those offsets' encodings:
  made once per step for the whole batch (it has no batch axis), so shared by its
  `rows_per_step` sequences. Heads add their own (`Objective.flops_per_token`).
  """
  d, f, n = config.hidden_size, config.mlp_dim, config.num_layers
  mlp_matrices = 2 if config.mlp_activation == "gelu" else 3
  flops = 6 * n * (4 * d * d + mlp_matrices * d * f) + 12 * n * d * seq_len
  if config.position_encoding == "relative":
    flops += 6 * n * (2 * d * d / max(rows_per_step, 1) + 2 * d * seq_len)
  return float(flops)


def training_flops_per_token(config: ModelConfig, seq_len: int, objectives: Sequence[Objective],
                             predictions_per_seq: Mapping[str, float] | None = None,
                             rows_per_step: int = 1) -> float:
  """A step's training FLOPs per input token: one encoder pass per view the enabled objectives
  need, plus each objective's head and view-specific work (PLM's query stream).

  `predictions_per_seq` maps an objective's name to the mean predictions per sequence measured
  in the batches (e.g. `mlm_weights.sum() / rows`); objectives whose head cost follows it (MLM)
  use it, the others (and any absent) their own expectation. `rows_per_step`: the global batch
  (what the encoder computes once per step is shared by it).
  """
  predictions_per_seq = predictions_per_seq or {}
  passes = len({o.view for o in objectives if o.head})
  return passes * encoder_flops_per_token(config, seq_len, rows_per_step) + sum(
      o.flops_per_token(config, predictions_per_seq.get(o.name)) for o in objectives)
