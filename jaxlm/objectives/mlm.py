"""Masked language modelling, as in BERT.

Config `objectives.mlm`: `weight`, `mask_rate` (share of non-special tokens predicted),
`max_predictions_per_seq`, `mask_token_prob` / `random_token_prob` (the 80/10/10 split; the rest
keep their token) and `whole_word` (choose whole words, using sentencepiece word starts).
"""

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data.masking import MaskingOptions, mask_tokens
from jaxlm.data.tokenizer import NUM_SPECIAL
from jaxlm.errors import UserError
from jaxlm.models.heads import MlmHead
from jaxlm.objectives.base import Aux, Batch, Objective, mean_cross_entropy, register


@register
class MaskedLm(Objective):
  name = "mlm"
  head = MlmHead
  corrupted_input = "mlm_input_ids"
  default_options = dict(
      weight=1.0,
      mask_rate=0.15,
      max_predictions_per_seq=20,
      mask_token_prob=0.8,
      random_token_prob=0.1,
      whole_word=False,
  )

  # BERT's recipe; -1 predictions = ceil(mask_rate x seq_len), BERT's 20 at 128 and 77 at 512.
  default_eval_options = dict(
      mask_rate=0.15,
      max_predictions_per_seq=-1,
      mask_token_prob=0.8,
      random_token_prob=0.1,
      whole_word=False,
  )

  def __init__(self, options, data, eval_options=None):
    super().__init__(options, data, eval_options)
    self.masking = _masking(options, "objectives.mlm", data.seq_len)
    self.eval_masking = _masking(eval_options or dict(self.default_eval_options), "eval.mlm",
                                 data.seq_len)

  def host_transform(self, batch: Batch, keys_B: np.ndarray) -> Batch:
    return self._mask(batch, keys_B, self.masking)

  def eval_transform(self, batch: Batch, keys_B: np.ndarray) -> Batch:
    return self._mask(batch, keys_B, self.eval_masking)

  def _mask(self, batch: Batch, keys_B: np.ndarray, masking: MaskingOptions) -> Batch:
    masked = mask_tokens(batch["input_ids"], keys_B, masking, vocab_size=self.data.vocab_size,
                         word_start_V=self.data.word_start)
    masked[self.corrupted_input] = masked.pop("input_ids")  # Others still see the clean ids.
    return {**batch, **masked}

  def flops_per_token(self, model, predictions_per_seq: float | None = None) -> float:
    """The head (transform and vocabulary projection) at the predicted positions only: the
    measured `predictions_per_seq` (mean of `mlm_weights` per row), else what the masking picks
    in a row of seq_len - 2 text tokens. Empty slots up to `max_predictions_per_seq` are padding,
    not model work."""
    d = model.hidden_size
    per_prediction = 6 * (d * model.vocab_size + d * d)
    if predictions_per_seq is None:
      text = self.data.seq_len - 2  # [CLS] ... [SEP]
      predictions_per_seq = min(self.masking.max_predictions,
                                max(1, round(text * self.masking.rate)))
    return per_prediction * predictions_per_seq / self.data.seq_len

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Aux]:
    loss, aux = mean_cross_entropy(outputs["mlm"], batch["mlm_ids"], batch["mlm_weights"], "mlm")
    # What the masking really did: the share of text tokens predicted (the cap may bite).
    aux["mlm_mask_rate"] = (jnp.sum(batch["mlm_weights"]),
                            jnp.sum(batch["input_ids"] >= NUM_SPECIAL).astype(jnp.float32))
    return loss, aux


def _masking(options, prefix: str, seq_len: int) -> MaskingOptions:
  """Checked masking options; max_predictions_per_seq -1 derives it from the rate."""
  predictions = options["max_predictions_per_seq"]
  if predictions == -1:
    predictions = math.ceil(options["mask_rate"] * seq_len)
  if not 0.0 < options["mask_rate"] <= 1.0 or predictions < 1:
    raise UserError(f"{prefix}.mask_rate must be in (0, 1] and {prefix}.max_predictions_per_seq "
                    "at least 1 (or -1: from the rate).")
  if min(options["mask_token_prob"], options["random_token_prob"]) < 0 or (
      options["mask_token_prob"] + options["random_token_prob"] > 1.0):
    raise UserError(f"{prefix}.mask_token_prob and random_token_prob must be >= 0 and sum to at "
                    "most 1 (the rest keep their token).")
  return MaskingOptions(rate=options["mask_rate"], max_predictions=predictions,
                        mask_token_prob=options["mask_token_prob"],
                        random_token_prob=options["random_token_prob"],
                        whole_word=options["whole_word"])
