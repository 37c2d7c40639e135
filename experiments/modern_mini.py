"""A modern encoder recipe at BERT-mini size (L4 H256 A4), at BERT-mini's FLOPs per token.

  python -m jaxlm.train --config=experiments/modern_mini.py --workdir=runs/modern_mini \
      --config.data.train_files=../shared/corpora/kernel-docs.txt.gz --config.train.steps=800

Compare with `experiments/bert_mini.py` (BERT's recipe) at the same budget: both evaluate MLM on
the same fixed eval set with the same eval masking (`config.eval.mlm`, 15% 80-10-10).
"""

from configs import base, models, optimizers


def get_config():
  config = base.get_config()
  config.model = models.modern("mini", vocab_size=8192)
  config.data.format = "full_sentences"
  config.data.seq_len = 128
  config.data.batch_size = 32
  config.data.eval_examples = 1024  # As bert_mini.py: the same fixed eval set.
  config.objectives.nsp.weight = 0.0
  config.objectives.mlm.update(mask_rate=0.4, mask_token_prob=1.0, random_token_prob=0.0)
  config.optimizer = optimizers.adamw_roberta(learning_rate=2e-3, warmup_steps=50)
  config.optimizer.update(decay="trapezoid", cooldown_fraction=0.3)
  config.train.steps = 2000
  config.train.log_every = 25
  config.train.eval_every = 250
  config.train.checkpoint_every = 500
  return config
