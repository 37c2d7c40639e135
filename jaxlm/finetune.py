"""Fine-tune a pretrained encoder for classification:

  python -m jaxlm.finetune --config=experiments/finetune_classify.py --workdir=W2 \
      --config.init_from=W --config.data.train_file=F --config.data.eval_file=G

F and G are JSONL, TSV or CSV files with `text`, optional `text_b` and `label`. LoRA:
`--config.lora.rank=8`. Writes `eval/accuracy` (and `eval/f1` for two classes) to
`W2/metrics.jsonl`; resumes like training.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from jaxlm import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and labels.")
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  cli.initialize_distributed()
  from jaxlm.training import finetuning

  finetuning.finetune(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.exit(cli.run(main))
