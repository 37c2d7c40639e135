"""Causal language modelling (GPT): predict each next token, attending only to earlier ones.

Config `objectives.clm`: `weight`. Its head reads a causal encoder pass over the uncorrupted ids
(`Objective.view`; a second pass, same weights, when MLM or NSP is on too), and
the loss is the cross-entropy of token t + 1 at every position t whose next token is text or an
end-of-document `[SEP]` (padding is not predicted). Any data format works; `packed` is the
GPT-style one (no padding, documents joined by `[SEP]`).
"""

from collections.abc import Mapping

import jax
import numpy as np

from jaxlm.data.tokenizer import PAD_ID
from jaxlm.models.heads import LmHead
from jaxlm.objectives.base import Aux, Batch, Objective, mean_cross_entropy, register


@register
class CausalLm(Objective):
  name = "clm"
  head = LmHead
  default_options = dict(weight=1.0)
  view = "causal"

  def host_transform(self, batch: Batch, keys_B: np.ndarray) -> Batch:
    """Targets shifted by one: position t predicts token t + 1 (the last position nothing)."""
    ids_BL = batch["input_ids"]
    next_BL = np.zeros_like(ids_BL)
    next_BL[:, :-1] = ids_BL[:, 1:]
    return {**batch, "clm_ids": next_BL, "clm_weights": (next_BL != PAD_ID).astype(np.float32)}

  def flops_per_token(self, model, predictions_per_seq: float | None = None) -> float:
    del predictions_per_seq  # Logits at every position, whatever their weight.
    d = model.hidden_size
    return 6.0 * (d * model.vocab_size + d * d)  # The head at every position.

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Aux]:
    return mean_cross_entropy(outputs["clm"], batch["clm_ids"], batch["clm_weights"], "clm")
