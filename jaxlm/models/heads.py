"""Pretraining heads. Each takes the encoder output and the batch, returns float32 logits."""

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import dropout, init
from jaxlm.parallel import axes
from jaxlm.models.config import ModelConfig
from jaxlm.models.encoder import EncoderOutput


def _output_logits(module: nn.Module, c: ModelConfig, h_BXD: jax.Array,
                   table_VD: jax.Array) -> jax.Array:
  """Float32 logits over the vocabulary, for any leading shape: BERT's output transform
  (dense -> GELU -> norm; left out with `model.mlm_head_transform=False`), a projection onto
  the token embedding table (or, with `model.tie_output_embedding=False`, onto this head's own
  `output_embedding`), plus a per-token bias (none with `model.use_bias=False`)."""
  if c.mlm_head_transform:
    h_BXD = init.dense(c, c.hidden_size, (axes.EMBED, axes.EMBED_OUT), "transform")(h_BXD)
    h_BXD = init.norm(c, "layer_norm")(dropout.gelu(h_BXD))
  if not c.tie_output_embedding:
    table_VD = module.param("output_embedding", init.weights(c, (axes.VOCAB, axes.EMBED)),
                            (c.vocab_size, c.hidden_size), c.param_dtype)
  logits = jnp.einsum("...d,vd->...v", h_BXD.astype(c.dtype), table_VD.astype(c.dtype),
                      preferred_element_type=jnp.float32)
  if not c.use_bias:
    return logits
  bias_V = module.param("bias", init.zeros((axes.VOCAB,)), (c.vocab_size,), c.param_dtype)
  return logits + bias_V.astype(jnp.float32)


class MlmHead(nn.Module):
  """BERT's MLM head, evaluated only at the predicted positions (`batch['mlm_positions']`).

  Computing logits at P predicted positions instead of all L saves (L - P) x hidden x vocab
  multiply-adds per sequence, the largest single cost of a small encoder's step.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
      self, encoded: EncoderOutput, batch: Mapping[str, jax.Array], deterministic: bool
  ) -> jax.Array:
    positions_BP = batch["mlm_positions"]
    h_BPD = jnp.take_along_axis(encoded.sequence_BLD, positions_BP[..., None], axis=1)
    logits_BPV = _output_logits(self, self.config, h_BPD, encoded.token_table_VD)
    return nn.with_logical_constraint(logits_BPV, (axes.BATCH, axes.PREDICTIONS, axes.VOCAB))


class LmHead(nn.Module):
  """A language-model head at every position (CLM): `MlmHead`'s output over the whole
  sequence, `[B, L, V]` float32 logits."""

  config: ModelConfig

  @nn.compact
  def __call__(
      self, encoded: EncoderOutput, batch: Mapping[str, jax.Array], deterministic: bool
  ) -> jax.Array:
    logits_BLV = _output_logits(self, self.config, encoded.sequence_BLD, encoded.token_table_VD)
    return nn.with_logical_constraint(logits_BLV, (axes.BATCH, axes.LENGTH, axes.VOCAB))


class PlmHead(nn.Module):
  """XLNet's permuted-LM head: `MlmHead`'s output over the query stream (one row per target),
  `[B, P, V]` float32 logits."""

  config: ModelConfig

  @nn.compact
  def __call__(
      self, encoded: EncoderOutput, batch: Mapping[str, jax.Array], deterministic: bool
  ) -> jax.Array:
    if encoded.query_BPD is None:
      raise ValueError("PlmHead reads the query stream: run the encoder with `query=`.")
    logits_BPV = _output_logits(self, self.config, encoded.query_BPD, encoded.token_table_VD)
    return nn.with_logical_constraint(logits_BPV, (axes.BATCH, axes.PREDICTIONS, axes.VOCAB))


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


class ClassificationHead(nn.Module):
  """Sequence classification for fine-tuning: pooled [CLS] -> dropout -> `num_classes` float32
  logits. Pretrainer builds heads as `head(config, name=...)`, so a run passes
  `functools.partial(ClassificationHead, num_classes=C)`."""

  config: ModelConfig
  num_classes: int

  @nn.compact
  def __call__(
      self, encoded: EncoderOutput, batch: Mapping[str, jax.Array], deterministic: bool
  ) -> jax.Array:
    c = self.config
    h_BD = dropout.Dropout(c.dropout_rate)(encoded.pooled_BD, deterministic=deterministic)
    logits_BC = init.dense(c, self.num_classes, (axes.EMBED, axes.CLASSES), "classifier")(h_BD)
    return logits_BC.astype(jnp.float32)
