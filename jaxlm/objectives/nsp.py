"""Next sentence prediction, as in BERT: is segment B the text that follows A?

Config `objectives.nsp`: `weight` and `random_next_prob` (how often B comes from another
document). The pairs themselves are built by the `pairs` format (`jaxlm.data.formats.pairs`),
the only one it trains on; this objective asks for random-next pairs and scores the NSP head.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxlm.errors import UserError
from jaxlm.models.heads import NspHead
from jaxlm.objectives.base import Aux, Objective, mean_cross_entropy, register


@register
class NextSentencePrediction(Objective):
  name = "nsp"
  head = NspHead
  default_options = dict(weight=1.0, random_next_prob=0.5)
  formats = ("pairs",)
  perplexity = False  # A two-way classifier: its loss is not a language model's.

  def __init__(self, options, data, eval_options=None):
    super().__init__(options, data, eval_options)
    if not 0.0 < options.random_next_prob < 1.0:
      raise UserError("objectives.nsp.random_next_prob must be in (0, 1): NSP needs both labels.")

  def example_options(self) -> dict:
    return {"random_next_prob": float(self.options.random_next_prob)}

  def flops_per_token(self, model, predictions_per_seq: float | None = None) -> float:
    """The pooler (hidden x hidden at [CLS]) and the two-way classifier, once per sequence."""
    del predictions_per_seq
    d = model.hidden_size
    return 6.0 * (d * d + 2 * d) / self.data.seq_len

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Aux]:
    labels = batch["next_sentence_label"]  # -1 on the padding rows of the last eval batch.
    real = (labels >= 0).astype(jnp.float32)
    loss, aux = mean_cross_entropy(outputs["nsp"], jnp.maximum(labels, 0), real, "nsp")
    # The label balance the pairs really had (random_next_prob asks for it).
    aux["nsp_random_next_share"] = (jnp.sum(labels == 1).astype(jnp.float32), jnp.sum(real))
    return loss, aux
