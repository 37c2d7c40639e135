"""Masked language modelling, as in BERT.

Config `objectives.mlm`: `weight`, `mask_rate` (share of non-special tokens predicted),
`max_predictions_per_seq`, `mask_token_prob` / `random_token_prob` (the 80/10/10 split; the rest
keep their token) and `whole_word` (choose whole words, using sentencepiece word starts).
"""

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from jaxlm.data.masking import MaskingOptions, mask_tokens
from jaxlm.errors import UserError
from jaxlm.models.heads import MlmHead
from jaxlm.objectives.base import Aux, Batch, Objective, mean_cross_entropy, register


@register
class MaskedLm(Objective):
  name = "mlm"
  head = MlmHead
  default_options = dict(
      weight=1.0,
      mask_rate=0.15,
      max_predictions_per_seq=20,
      mask_token_prob=0.8,
      random_token_prob=0.1,
      whole_word=False,
  )

  def __init__(self, options, data):
    super().__init__(options, data)
    if not 0.0 < options.mask_rate <= 1.0 or options.max_predictions_per_seq < 1:
      raise UserError("objectives.mlm.mask_rate must be in (0, 1] and "
                      "objectives.mlm.max_predictions_per_seq at least 1.")
    if min(options.mask_token_prob, options.random_token_prob) < 0 or (
        options.mask_token_prob + options.random_token_prob > 1.0):
      raise UserError("objectives.mlm.mask_token_prob and random_token_prob must be >= 0 and "
                      "sum to at most 1 (the rest keep their token).")
    self.masking = MaskingOptions(
        rate=options.mask_rate,
        max_predictions=options.max_predictions_per_seq,
        mask_token_prob=options.mask_token_prob,
        random_token_prob=options.random_token_prob,
        whole_word=options.whole_word,
    )

  def host_transform(self, batch: Batch, rngs: Sequence[np.random.Generator]) -> Batch:
    masked = mask_tokens(
        batch["input_ids"],
        rngs,
        self.masking,
        vocab_size=self.data.vocab_size,
        word_start_V=self.data.word_start,
    )
    return {**batch, **masked}

  def flops_per_token(self, model) -> float:
    d = model.hidden_size
    per_prediction = 6 * (d * model.vocab_size + d * d)
    return per_prediction * self.masking.max_predictions / self.data.seq_len

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Aux]:
    return mean_cross_entropy(outputs["mlm"], batch["mlm_ids"], batch["mlm_weights"], "mlm")
