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
  # Which encoder pass feeds each head. The heads named in `causal_heads` read a causal pass over
  # the uncorrupted `input_ids`; the others one bidirectional pass over `batch[bidirectional_input]`
  # (the ids an objective corrupted, as MLM's masked ids), or `input_ids` when the batch has none
  # (an eval set that objective does not corrupt). One pass per view, sharing every weight.
  causal_heads: tuple[str, ...] = ()
  bidirectional_input: str = "input_ids"

  @nn.compact
  def __call__(
      self, batch: Mapping[str, jax.Array], *, deterministic: bool
  ) -> dict[str, jax.Array]:
    encoder = Encoder(self.config, name="encoder")
    passes = {}
    outputs = {}
    for name, head in self.heads:
      causal = name in self.causal_heads
      if causal not in passes:
        ids = batch["input_ids"] if causal else batch.get(self.bidirectional_input,
                                                          batch["input_ids"])
        passes[causal] = encoder(ids, batch["token_type_ids"], deterministic=deterministic,
                                 mask_BHQK=None if causal else batch.get("attention_mask"),
                                 causal=causal)
      outputs[name] = head(self.config, name=name)(passes[causal], batch, deterministic)
    return outputs
