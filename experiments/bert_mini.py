"""BERT-mini (L4 H256 A4), MLM + NSP, 8k vocabulary, on the embedded corpus by default.

  python -m jaxlm.train --config=experiments/bert_mini.py --workdir=runs/mini \
      --config.data.train_files=../shared/corpora/kernel-docs.txt.gz
"""

from configs import base, models


def get_config():
  config = base.get_config()
  config.model = models.bert("mini", vocab_size=8192)
  config.data.seq_len = 128
  config.data.batch_size = 32
  config.optimizer.learning_rate = 5e-4
  config.optimizer.warmup_steps = 100
  config.train.steps = 2000
  config.train.log_every = 25
  config.train.eval_every = 250
  config.train.checkpoint_every = 500
  config.data.eval_examples = 1024  # A quarter of the default: eval stays under 10% of a CPU run.
  return config
