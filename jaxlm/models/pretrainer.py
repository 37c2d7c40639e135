"""The model a pretraining run trains: one encoder, and one head per enabled objective."""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.data.tokenizer import PAD_ID
from jaxlm.models.attention import example_mask, two_stream_masks
from jaxlm.models.config import ModelConfig
from jaxlm.models.encoder import Encoder, EncoderOutput, QueryStream

# How a head's encoder pass sees the batch (an objective's `Objective.view`).
BIDIRECTIONAL, CAUSAL, PERMUTED = "bidirectional", "causal", "permuted"
VIEWS = (BIDIRECTIONAL, CAUSAL, PERMUTED)


class Pretrainer(nn.Module):
  """Runs the encoder once per view of the batch and every head on its view's output.

  `heads` pairs a name with a head class (`(("mlm", MlmHead), ("nsp", NspHead))`); objectives
  choose them, so this module never names an objective. Parameters live under `encoder/` and
  `<name>/`, which is also what fine-tuning and export read.

  Views, one encoder pass each, sharing every weight (`views` names a head's; default
  bidirectional):
  - bidirectional: full attention over `batch[bidirectional_input]` (the ids an objective
    corrupted, as MLM's masked ids), or `input_ids` when the batch has none (an eval set that
    objective does not corrupt); in packed rows (`example_ids` in the batch) within each
    example, at its own positions, pooled at each example's [CLS];
  - causal: each position attends to itself and earlier ones, over the clean `input_ids`;
  - permuted: XLNet's two streams over the clean ids, physically reordered by `plm_perm`
    (non-targets, then the targets in factorisation order) so that both masks are constants.
  """

  config: ModelConfig
  heads: tuple[tuple[str, type[nn.Module]], ...]
  views: tuple[tuple[str, str], ...] = ()
  bidirectional_input: str = "input_ids"

  @classmethod
  def for_objectives(cls, config: ModelConfig, objectives) -> "Pretrainer":
    """The model of a run with these objectives (`jaxlm.objectives.Objective`s): their heads,
    their views, and the bidirectional pass reading the ids they corrupt."""
    return cls(
        config, heads=tuple((o.name, o.head) for o in objectives if o.head),
        views=tuple((o.name, o.view) for o in objectives),
        bidirectional_input=next((o.corrupted_input for o in objectives
                                  if o.corrupted_input and o.view == BIDIRECTIONAL), "input_ids"))

  @nn.compact
  def __call__(
      self, batch: Mapping[str, jax.Array], *, deterministic: bool
  ) -> dict[str, jax.Array]:
    encoder = Encoder(self.config, name="encoder")
    view_of = dict(self.views)
    passes = {}
    outputs = {}
    for name, head in self.heads:
      view = view_of.get(name, BIDIRECTIONAL)
      if view not in passes:
        passes[view] = self._encode(encoder, view, batch, deterministic)
      outputs[name] = head(self.config, name=name)(passes[view], batch, deterministic)
    return outputs

  def _encode(self, encoder: Encoder, view: str, batch, deterministic: bool) -> EncoderOutput:
    if view == CAUSAL:
      return encoder(batch["input_ids"], batch["token_type_ids"], deterministic=deterministic,
                     causal=True)
    if view == PERMUTED:
      return encoder(**permuted_inputs(batch), deterministic=deterministic)
    if view != BIDIRECTIONAL:
      raise ValueError(f"Unknown view '{view}'; views are {VIEWS}.")
    mask_BHQK, positions_BL, cls_BK = batch.get("attention_mask"), None, None
    if "example_ids" in batch:  # Packed rows: examples apart, positions and [CLS] per example.
      mask_BHQK = example_mask(batch["example_ids"])
      positions_BL, cls_BK = batch["position_ids"], batch["cls_positions"]
    return encoder(batch.get(self.bidirectional_input, batch["input_ids"]),
                   batch["token_type_ids"], deterministic=deterministic,
                   mask_BHQK=mask_BHQK, position_ids_BL=positions_BL, cls_positions_BK=cls_BK)


def permuted_inputs(batch: Mapping[str, jax.Array]) -> dict:
  """The encoder's arguments for the permuted view: ids, types and positions gathered in slot
  order, the constant two-stream masks restricted to non-padding keys, and one query per
  target slot (the last P)."""
  perm_BL = batch["plm_perm"]
  length, num_targets = perm_BL.shape[1], batch["plm_target_weights"].shape[1]
  ids_BL = jnp.take_along_axis(batch["input_ids"], perm_BL, axis=1)
  types_BL = jnp.take_along_axis(batch["token_type_ids"], perm_BL, axis=1)
  content_11LL, query_11PL = two_stream_masks(length, num_targets)
  keys_B11L = (ids_BL != PAD_ID)[:, None, None, :]
  query = QueryStream(mask_BHPK=query_11PL & keys_B11L,
                      positions_BP=perm_BL[:, length - num_targets:],
                      token_type_ids_BP=types_BL[:, length - num_targets:])
  return dict(input_ids_BL=ids_BL, token_type_ids_BL=types_BL, mask_BHQK=content_11LL & keys_B11L,
              position_ids_BL=perm_BL, query=query)
