"""The model a pretraining run trains: one encoder, and one head per enabled objective."""

from collections.abc import Mapping

import flax.linen as nn
import jax

from jaxlm.models.config import ModelConfig
from jaxlm.models.encoder import Encoder


class Pretrainer(nn.Module):
  """Runs the encoder once and every head on its output.

  `heads` pairs a name with a head class (`(("mlm", MlmHead), ("nsp", NspHead))`); objectives
  choose them, so this module never names an objective. Parameters live under `encoder/` and
  `<name>/`, which is also what fine-tuning and export read.
  """

  config: ModelConfig
  heads: tuple[tuple[str, type[nn.Module]], ...]
  causal: bool = False  # The encoder's view: causal attention (CLM) or bidirectional.

  @nn.compact
  def __call__(
      self, batch: Mapping[str, jax.Array], *, deterministic: bool
  ) -> dict[str, jax.Array]:
    encoded = Encoder(self.config, name="encoder")(
        batch["input_ids"],
        batch["token_type_ids"],
        deterministic=deterministic,
        mask_BHQK=batch.get("attention_mask"),
        causal=self.causal,
    )
    return {
        name: head(self.config, name=name)(encoded, batch, deterministic)
        for name, head in self.heads
    }
