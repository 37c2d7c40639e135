"""The BERT encoder: embeddings, N Transformer layers, and the [CLS] pooler."""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlm.models import init
from jaxlm.parallel import axes
from jaxlm.models.attention import padding_mask
from jaxlm.models.config import ModelConfig
from jaxlm.models.embeddings import Embeddings
from jaxlm.models.layers import TransformerLayer


@flax.struct.dataclass
class EncoderOutput:
  sequence_BLD: jax.Array  # Final hidden states.
  pooled_BD: jax.Array  # tanh(dense(h[CLS])), BERT's sentence representation.
  token_table_VD: jax.Array  # The token embedding table, for heads tied to it.


class Encoder(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(
      self,
      input_ids_BL: jax.Array,
      token_type_ids_BL: jax.Array,
      *,
      deterministic: bool,
      mask_BHQK: jax.Array | None = None,
  ) -> EncoderOutput:
    """`mask_BHQK` defaults to the padding mask; objectives may pass their own (causal, ...)."""
    c = self.config
    if mask_BHQK is None:
      mask_BHQK = padding_mask(input_ids_BL)
    h_BLD, table_VD = Embeddings(c, name="embeddings")(
        input_ids_BL, token_type_ids_BL, deterministic
    )
    h_BLD = nn.with_logical_constraint(h_BLD, (axes.BATCH, axes.LENGTH, axes.EMBED))
    for i in range(c.num_layers):
      h_BLD = TransformerLayer(c, name=f"layer_{i}")(h_BLD, mask_BHQK, deterministic)
    if c.pre_layer_norm:
      h_BLD = init.layer_norm(c, "final_norm")(h_BLD)
    pooled_BD = nn.Dense(
        c.hidden_size,
        dtype=c.dtype,
        param_dtype=c.param_dtype,
        kernel_init=init.weights(c, (axes.EMBED, axes.EMBED_OUT)),
        bias_init=init.zeros((axes.EMBED_OUT,)),
        name="pooler",
    )(h_BLD[:, 0])
    return EncoderOutput(h_BLD, jnp.tanh(pooled_BD), table_VD)
