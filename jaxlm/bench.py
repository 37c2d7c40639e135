"""Benchmarks: `python -m jaxlm.bench --pipeline --config=FILE [--config.k=v ...] [--steps=N]`.

`--pipeline` times the host input pipeline alone, exactly as a run builds it: examples of the
config's format read from prepared shards, every enabled objective's host transform, batches of
the config's size, with `data.workers` processes (0: built in this thread). The last line printed
is JSON with `tokens_per_sec` and `workers`.
"""

import json
import os
import sys
import tempfile
import time

from absl import flags
from ml_collections import config_flags

from jaxlm import cli
from jaxlm.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                          lock_config=True)
_PIPELINE = flags.DEFINE_bool("pipeline", False, "Time the host input pipeline alone.")
_STEPS = flags.DEFINE_integer("steps", 200, "Batches to time (after a warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Batches built before timing starts (at least 1).")
_WORKDIR = flags.DEFINE_string(
    "workdir", os.path.join(tempfile.gettempdir(), "jaxlm-bench"),
    "Where text inputs are prepared on first use (a prepared folder is read in place).")


def pipeline_benchmark(config, workdir: str, steps: int, warmup: int) -> dict:
  """Times `steps` batches of the run's training pipeline; returns the figures."""
  from jaxlm import config as config_lib
  from jaxlm.training import inputs, loop

  config_lib.validate(config)
  loop.prepare_workdir(workdir)
  sources, objectives, train, _ = inputs.build_inputs(config, workdir, config.model.vocab_size)
  d = config.data
  batches = train.iterate(0, warmup + steps, workers=d.workers)  # As the training loop does.
  started = time.perf_counter()
  for step, _ in batches:
    if step == warmup - 1:  # Warm-up done (workers started, pages of the shards read once).
      started = time.perf_counter()
  seconds = time.perf_counter() - started
  timed = steps
  tokens = timed * d.batch_size * d.seq_len
  return dict(
      tokens_per_sec=round(tokens / seconds),
      batches_per_sec=round(timed / seconds, 1),
      ms_per_batch=round(1e3 * seconds / timed, 3),
      workers=d.workers, format=d.format, objectives=[o.name for o in objectives],
      batch_size=d.batch_size, seq_len=d.seq_len, steps=timed, data=sources.fingerprint,
      train_tokens=sources.train.num_tokens)


def main(argv):
  del argv
  if not _PIPELINE.value:
    raise UserError("Only the pipeline benchmark exists yet: pass --pipeline.")
  if _STEPS.value < 1 or _WARMUP.value < 1:
    raise UserError("--steps and --warmup must be at least 1.")
  result = pipeline_benchmark(_CONFIG.value, _WORKDIR.value, _STEPS.value, _WARMUP.value)
  print(json.dumps(result))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  sys.exit(cli.run(main))
