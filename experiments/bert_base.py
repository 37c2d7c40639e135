"""BERT-base, the original recipe: seq 128, batch 256, lr 1e-4, 10k warm-up, 1M steps.

  python -m jaxlm.train --config=experiments/bert_base.py --workdir=runs/bert_base \
      --config.data.train_files='corpus/*.txt.gz'

(Devlin et al. ran 90% of the steps at seq 128 and the last 10% at 512.) It starts and runs on
a CPU, slowly; it is meant for accelerators.
"""

from configs import base, models, optimizers


def get_config():
  config = base.get_config()
  config.model = models.bert("base", vocab_size=30522)
  # Batch 256 in 16 slices of 16: activations of ~4 GB instead of ~58 GB, so the recipe also
  # runs on a 24 GB CPU host. On accelerators, lower this as far as memory allows.
  config.train.microbatches = 16
  config.optimizer = optimizers.adamw_bert(learning_rate=1e-4, warmup_steps=10_000)
  config.data.seq_len = 128
  config.data.batch_size = 256
  config.train.steps = 1_000_000
  config.train.log_every = 100
  config.train.eval_every = 10_000
  config.train.checkpoint_every = 10_000
  return config
