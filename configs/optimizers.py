"""Optimizer presets for `config.optimizer`."""

import ml_collections


def adamw_bert(learning_rate: float = 1e-4, warmup_steps: int = 10_000) -> ml_collections.ConfigDict:
  """BERT's optimizer: AdamW (b1 0.9, b2 0.999, eps 1e-6, decay 0.01), clip 1.0, linear decay."""
  return ml_collections.ConfigDict(
      dict(
          learning_rate=learning_rate,  # Peak, reached at the end of warm-up.
          warmup_steps=warmup_steps,  # Linear warm-up from 0.
          # After warm-up: linear | cosine | constant, over train.steps; trapezoid: constant,
          # then linear over the last cooldown_fraction of train.steps.
          decay="linear",
          end_learning_rate_ratio=0.0,  # Final learning rate as a fraction of the peak.
          cooldown_fraction=0.2,  # Read by decay=trapezoid only.
          b1=0.9,
          b2=0.999,
          eps=1e-6,
          weight_decay=0.01,  # Decoupled; never on LayerNorm parameters or biases.
          clip_norm=1.0,  # Global gradient-norm clipping; 0 disables it.
      )
  )


def adamw_roberta(learning_rate: float = 6e-4, warmup_steps: int = 24_000) -> ml_collections.ConfigDict:
  """RoBERTa's variant: b2 0.98 (steadier with large batches and learning rates), eps 1e-6."""
  config = adamw_bert(learning_rate, warmup_steps)
  config.b2 = 0.98
  return config


def adamw_fast(learning_rate: float = 3e-3, warmup_steps: int = 20) -> ml_collections.ConfigDict:
  """For minutes-long runs of tiny models: a short warm-up and a high peak."""
  return adamw_bert(learning_rate, warmup_steps)
