"""Evaluate a trained run: `python -m jaxlm.evaluate --workdir=W [--step=N]`.

Restores the parameters alone (no optimizer state) of the newest checkpoint, or of `--step`,
and reports every objective's loss, accuracy and perplexity on the fixed eval set, exactly as
training does: printed as a table and appended to `<workdir>/metrics.jsonl` as `eval/` rows.
Any key of the run's saved config can be overridden, e.g. another eval corpus with
`--config.data.eval_files=PATH` or a bigger set with `--config.data.eval_examples=N`.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxlm import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config to evaluate with (default: the run's saved config).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's folder.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_WRITE = flags.DEFINE_bool("write", True, "Append the eval row to <workdir>/metrics.jsonl.")
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  cli.initialize_distributed()
  from jaxlm.training import evaluation

  row = evaluation.evaluate_run(_WORKDIR.value, _CONFIG.value, _STEP.value, write=_WRITE.value)
  print(evaluation.format_table(row))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  sys.exit(cli.run(main, argv=cli.use_saved_config(sys.argv)))
