"""BERT-tiny (L2 H128 A2), MLM + NSP, on the embedded Jargon File corpus.

Learns visibly in about two minutes on 2 CPU cores:

  python -m jaxlm.train --config=experiments/bert_tiny.py --workdir=runs/tiny
"""

from configs import base, models


def get_config():
  config = base.get_config()
  config.model = models.bert("tiny", vocab_size=1024)
  config.model.max_position = 128
  config.data.seq_len = 128
  config.data.batch_size = 32
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 20
  config.train.steps = 300
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.eval_batches = 4
  config.train.checkpoint_every = 100
  return config
