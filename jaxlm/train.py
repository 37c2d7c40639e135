"""Pretrain a model: `python -m jaxlm.train --config=experiments/bert_tiny.py --workdir=runs/tiny`.

Override any config key with `--config.<key>=<value>`. Several hosts: pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` on each, or nothing on TPU pods
and SLURM, where `jax.distributed.initialize()` finds them itself.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxlm import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and the tokenizer.")
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  cli.initialize_distributed()
  from jaxlm.training import loop

  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.exit(cli.run(main))
