"""Whole-run recipes shared by several experiments."""

import ml_collections

from configs import base, models, optimizers


def tiny_fast() -> ml_collections.ConfigDict:
  """BERT-tiny (L2 H128 A2) tuned to learn visibly within two minutes on 2 CPU cores.

  A 128-piece (nearly character-level) vocabulary, pre-LN, no dropout, seq 64, batch 128, a short
  warm-up and a high learning rate: with BERT's 8k-30k vocabularies a model this small sits on
  the unigram plateau for hundreds of steps (BUILD_NOTES.md). Objectives as in the base config.
  """
  config = base.get_config()
  config.model = models.bert("tiny", vocab_size=128)
  config.model.max_position = 128
  config.model.pre_layer_norm = True
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0
  config.data.seq_len = 64
  config.data.batch_size = 128
  config.data.eval_examples = 512
  config.objectives.mlm.max_predictions_per_seq = 10
  config.optimizer = optimizers.adamw_fast(learning_rate=3e-3, warmup_steps=20)
  config.train.steps = 300
  config.train.log_every = 10
  config.train.eval_every = 100
  config.train.checkpoint_every = 100
  return config
