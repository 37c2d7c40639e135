"""How to mask for MLM, at tiny size: the mask rate, 80-10-10 or always [MASK], whole words.

  python -m jaxlm.sweep --config=experiments/ablation_masking.py --workdir=runs/masking

MLM alone on `full_sentences` (RoBERTa's inputs, `roberta_tiny.py`) with the tiny recipe
(`recipes.tiny_fast`), one factor at a time from BERT's choice (15%, 80-10-10, single pieces):

- `rate_15`, `rate_30`, `rate_45`: the share of tokens predicted. `max_predictions_per_seq` is
  -1, so the cap follows the rate (ceil(rate x seq_len): 10, 20 and 29 of 64); with the recipe's
  cap of 10 the higher rates would silently stay near 15%.
- `always_mask`: every chosen token becomes [MASK] (`mask_token_prob=1`, `random_token_prob=0`),
  against BERT's 80% [MASK], 10% random, 10% kept.
- `whole_word` and `whole_word_rate_30`: all pieces of a word masked together, at 15% and at
  30% (whole-word masking is often paired with a higher rate).

Relative positions, as in `ablation_objectives.py`: at this size MLM learns much faster with them
(README, Results), so 300 steps separate the arms more clearly. Every arm is evaluated on the
same fixed eval set, masked BERT's way (`eval.mlm`: 15%, 80-10-10, whatever the training masks),
so the eval numbers measure the model, not the difficulty of its own masking.
The points differ little in FLOPs (only the MLM head's predictions), so the summary's
equal-compute table is close to its final one; evaluating every 50 steps is enough.
`python -m jaxlm.train --config=experiments/ablation_masking.py` alone runs `rate_15`.
"""

from configs import recipes


def get_config():
  """The base of every point: MLM alone on full sentences, BERT's masking, the cap following
  the rate."""
  config = recipes.tiny_fast()
  config.data.format = "full_sentences"
  config.objectives.nsp.weight = 0.0
  config.objectives.mlm.max_predictions_per_seq = -1
  config.model.position_encoding = "relative"
  config.train.eval_every = 50
  return config


def get_sweep():
  """The points: a name and the overrides of the base config (see jaxlm/sweep.py)."""
  always_mask = {"objectives.mlm.mask_token_prob": 1.0, "objectives.mlm.random_token_prob": 0.0}
  return [
      {"name": "rate_15", "overrides": {}},
      {"name": "rate_30", "overrides": {"objectives.mlm.mask_rate": 0.3}},
      {"name": "rate_45", "overrides": {"objectives.mlm.mask_rate": 0.45}},
      {"name": "always_mask", "overrides": always_mask},
      {"name": "whole_word", "overrides": {"objectives.mlm.whole_word": True}},
      {"name": "whole_word_rate_30",
       "overrides": {"objectives.mlm.whole_word": True, "objectives.mlm.mask_rate": 0.3}},
  ]
