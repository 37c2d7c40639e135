"""Pretraining heads. Each takes the encoder output and the batch, returns float32 logits."""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import init
from jaxlm.parallel import axes
from jaxlm.models.config import ModelConfig
from jaxlm.models.encoder import EncoderOutput


class MlmHead(nn.Module):
  """BERT's MLM head, evaluated only at the predicted positions (`batch['mlm_positions']`).

  dense -> GELU -> LayerNorm -> projection tied to the token embedding + a per-token bias.
  Computing logits at P predicted positions instead of all L saves (L - P) x hidden x vocab
  multiply-adds per sequence, the largest single cost of a small encoder's step.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
      self, encoded: EncoderOutput, batch: Mapping[str, jax.Array], deterministic: bool
  ) -> jax.Array:
    c = self.config
    positions_BP = batch["mlm_positions"]
    h_BPD = jnp.take_along_axis(encoded.sequence_BLD, positions_BP[..., None], axis=1)
    h_BPD = init.dense(c, c.hidden_size, (axes.EMBED, axes.EMBED_OUT), "transform")(h_BPD)
    h_BPD = init.layer_norm(c, "layer_norm")(nn.gelu(h_BPD, approximate=False))
    table_VD = encoded.token_table_VD.astype(c.dtype)
    logits_BPV = jnp.einsum("bpd,vd->bpv", h_BPD, table_VD, preferred_element_type=jnp.float32)
    bias_V = self.param("bias", init.zeros((axes.VOCAB,)), (c.vocab_size,), c.param_dtype)
    logits_BPV = logits_BPV + bias_V.astype(jnp.float32)
    return nn.with_logical_constraint(logits_BPV, (axes.BATCH, axes.PREDICTIONS, axes.VOCAB))


class LmHead(nn.Module):
  """A language-model head at every position (CLM): BERT's MLM transform, then the tied table.

  dense -> GELU -> LayerNorm -> projection tied to the token embedding + a per-token bias, as
  `MlmHead` but over the whole sequence: `[B, L, V]` float32 logits.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
      self, encoded: EncoderOutput, batch: Mapping[str, jax.Array], deterministic: bool
  ) -> jax.Array:
    c = self.config
    h_BLD = init.dense(c, c.hidden_size, (axes.EMBED, axes.EMBED_OUT), "transform")(
        encoded.sequence_BLD)
    h_BLD = init.layer_norm(c, "layer_norm")(nn.gelu(h_BLD, approximate=False))
    table_VD = encoded.token_table_VD.astype(c.dtype)
    logits_BLV = jnp.einsum("bld,vd->blv", h_BLD, table_VD, preferred_element_type=jnp.float32)
    bias_V = self.param("bias", init.zeros((axes.VOCAB,)), (c.vocab_size,), c.param_dtype)
    logits_BLV = logits_BLV + bias_V.astype(jnp.float32)
    return nn.with_logical_constraint(logits_BLV, (axes.BATCH, axes.LENGTH, axes.VOCAB))


class NspHead(nn.Module):
  """Next sentence prediction: two logits (0 = B follows A, 1 = B is random) from the pooler."""

  config: ModelConfig

  @nn.compact
  def __call__(
      self, encoded: EncoderOutput, batch: Mapping[str, jax.Array], deterministic: bool
  ) -> jax.Array:
    c = self.config
    logits_B2 = init.dense(c, 2, (axes.EMBED, axes.CLASSES), "classifier")(encoded.pooled_BD)
    return logits_B2.astype(jnp.float32)
