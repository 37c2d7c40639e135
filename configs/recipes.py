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


def modern(size: str, vocab_size: int, learning_rate: float,
           warmup_steps: int) -> ml_collections.ConfigDict:
  """The modern encoder recipe (`experiments/modern_mini.py` measures it): `models.modern(size)`,
  MLM alone on `full_sentences` at 40% always-[MASK] (Wettig et al. 2023), AdamW with b2 0.98
  and a trapezoid schedule (30% cool-down). Sizes, batch and steps are the experiment's."""
  config = base.get_config()
  config.model = models.modern(size, vocab_size=vocab_size)
  config.data.format = "full_sentences"
  config.objectives.nsp.weight = 0.0
  config.objectives.mlm.update(mask_rate=0.4, mask_token_prob=1.0, random_token_prob=0.0)
  config.optimizer = optimizers.adamw_roberta(learning_rate, warmup_steps)
  config.optimizer.update(decay="trapezoid", cooldown_fraction=0.3)
  return config
