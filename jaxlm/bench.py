"""Benchmarks: `python -m jaxlm.bench --config=FILE [--config.k=v ...] [--steps=N] [--pipeline]`.

By default it times the jitted train step a run uses (`step.train_step`, jitted as
`trainer.fit` does: the same shardings, donated state, the config's objectives, dropout and
micro-batches) on synthetic batches of the configured shape, made by the objectives' own host
transforms from random token ids (no corpus). After `--warmup` steps it times `--steps`
synchronised steps (each waited for) and takes the median. MFU is model FLOP/s over the peak:
on CPU the peak is measured in this process (a large float32 matmul through XLA on the same
devices with the same XLA flags, before and after the steps; the higher counts), on GPU/TPU the
datasheet's dense bf16 peak. Model FLOPs count the predictions the batches actually make
(`flops.training_flops_per_token`). The last line printed is JSON: `tokens_per_sec`, `step_ms`,
`model_flops_per_token`, `mfu`, `peak_flops`, `peak_source`, `compile_s`, `peak_memory_bytes`
and `peak_memory_source`, with the shape, the devices and the machine's load. `--ceiling` adds
`mfu_ceiling`: the step's own `dot_general`s (same shapes) timed alone in one jitted function,
as the MFU a step would reach whose every other operation cost nothing.

`--pipeline` times the host input pipeline alone, exactly as a run builds it: examples of the
config's format read from prepared shards, every enabled objective's host transform, batches of
the config's size, with `data.workers` processes (0: built in this thread). The last line printed
is JSON with `tokens_per_sec` and `workers`.
"""

import json
import os
import sys
import tempfile

from absl import flags
from ml_collections import config_flags

from jaxlm import cli
from jaxlm.errors import UserError
from jaxlm.training.throughput import pipeline_benchmark, step_benchmark

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                          lock_config=True)
_PIPELINE = flags.DEFINE_bool("pipeline", False, "Time the host input pipeline alone.")
_STEPS = flags.DEFINE_integer(
    "steps", None, "Steps (or batches) to time after the warm-up; default 20 (--pipeline: 200).")
_WARMUP = flags.DEFINE_integer(
    "warmup", None, "Steps (or batches) run before timing starts, at least 1; default 3 "
    "(--pipeline: 10).")
_CEILING = flags.DEFINE_bool(
    "ceiling", False, "Also time the step's own matrix products alone, in one jitted function: "
    "`mfu_ceiling` is the MFU the step would reach if nothing else cost time.")
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join(tempfile.gettempdir(), "jaxlm-bench"),
    "Where text inputs are prepared on first use (a prepared folder is read in place).")


def main(argv):
  del argv
  steps = _STEPS.value if _STEPS.value is not None else (200 if _PIPELINE.value else 20)
  warmup = _WARMUP.value if _WARMUP.value is not None else (10 if _PIPELINE.value else 3)
  if steps < 1 or warmup < 1:
    raise UserError("--steps and --warmup must be at least 1.")
  if _PIPELINE.value:
    result = pipeline_benchmark(_CONFIG.value, _WORKDIR.value, steps, warmup)
  else:
    result = step_benchmark(_CONFIG.value, steps, warmup, ceiling=_CEILING.value)
  print(json.dumps(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  sys.exit(cli.run(main))
