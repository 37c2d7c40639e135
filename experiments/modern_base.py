"""The modern encoder recipe (`modern_mini.py`) at BERT-base size, for accelerators.

  python -m jaxlm.train --config=experiments/modern_base.py --workdir=runs/modern_base \
      --config.data.train_files='corpus/*.txt.gz'

L12 H768 A12 with `configs/models.py`'s `modern()` choices (pre-LN, rotary positions, GEGLU at
mlp_dim 2048, no biases, no dropout), MLM alone at 40% always-[MASK] on `full_sentences`, and a
trapezoid schedule at a large batch, in the spirit of MosaicBERT (batch 4096, seq 128, 70k
steps) and Cramming. The choices are those `modern_mini.py` measured on the 2-core CPU; this
size was not run here (no accelerator was lent), so the learning rate is MosaicBERT's 5e-4 at
its batch, not a tuned one.
"""

from configs import recipes


def get_config():
  # A vocabulary that is a multiple of 64 (tensor cores, the MXU).
  config = recipes.modern("base", vocab_size=30528, learning_rate=5e-4, warmup_steps=4_000)
  config.data.seq_len = 128
  config.data.batch_size = 4096
  # 4096 x 128 in 64 slices of 64 sequences: fits a 24 GB host too; lower it on accelerators.
  config.train.microbatches = 64
  config.train.steps = 70_000
  config.train.log_every = 100
  config.train.eval_every = 5_000
  config.train.checkpoint_every = 5_000
  return config
