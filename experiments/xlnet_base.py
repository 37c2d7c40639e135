"""XLNet-base (L12 H768 A12): permuted LM with two-stream attention and relative positions.

  python -m jaxlm.train --config=experiments/xlnet_base.py --workdir=runs/xlnet_base \
      --config.data.train_files='corpus/*.txt.gz'

The pretraining hyperparameters of Yang et al. (2019), appendix A: sequence 512, partial
prediction K = 6, AdamW with eps 1e-6 and weight decay 0.01, linear decay after warm-up, dropout
0.1; span targets and a local permutation over blocks of 256 as in the released pretraining
script (`perm_size=256`, n-gram spans). The batch, learning rate and step count are those of the
paper's like-for-like comparison with BERT-base (batch 256, 1M steps); its large model used
batch 8192, lr 4e-4, 500k steps and 40k warm-up. Transformer-XL's memory is not implemented:
each 512-token window stands alone. It starts and runs on a CPU, slowly; it is meant for
accelerators.
"""

from configs import base, models, optimizers


def get_config():
  config = base.get_config()
  config.model = models.bert("base", vocab_size=32000)  # XLNet's sentencepiece vocabulary.
  config.model.position_encoding = "relative"
  config.data.format = "full_sentences"
  config.data.seq_len = 512
  config.data.batch_size = 256
  config.objectives.mlm.weight = 0.0
  config.objectives.nsp.weight = 0.0
  config.objectives.plm.weight = 1.0
  config.objectives.plm.partial_prediction = 6
  config.objectives.plm.perm_size = 256
  config.objectives.plm.span_targets = True
  config.optimizer = optimizers.adamw_bert(learning_rate=1e-4, warmup_steps=10_000)
  # Batch 256 at seq 512 in 64 slices of 4, so that the recipe also runs on a 24 GB CPU host.
  # On accelerators, lower this as far as memory allows.
  config.train.microbatches = 64
  config.train.steps = 1_000_000
  config.train.log_every = 100
  config.train.eval_every = 10_000
  config.train.checkpoint_every = 10_000
  return config
