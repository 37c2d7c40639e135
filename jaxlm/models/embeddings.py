"""Token, position and token-type embeddings, summed, normalised and dropped out (BERT)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import init
from jaxlm.parallel import axes
from jaxlm.models.config import ModelConfig


class Embeddings(nn.Module):
  """Returns `(h_BLD, token_table_VD)`; the table is handed on for the tied MLM output."""

  config: ModelConfig

  @nn.compact
  def __call__(
      self, input_ids_BL: jax.Array, token_type_ids_BL: jax.Array, deterministic: bool
  ) -> tuple[jax.Array, jax.Array]:
    c = self.config

    def table(name, rows, row_axis):
      return nn.Embed(
          rows,
          c.hidden_size,
          dtype=c.dtype,
          param_dtype=c.param_dtype,
          embedding_init=init.weights(c, (row_axis, axes.EMBED)),
          name=name,
      )

    tokens = table("token", c.vocab_size, axes.VOCAB)
    positions_BL = jnp.broadcast_to(jnp.arange(input_ids_BL.shape[1]), input_ids_BL.shape)
    h_BLD = (
        tokens(input_ids_BL)
        + table("position", c.max_position, axes.POSITION)(positions_BL)
        + table("token_type", c.type_vocab_size, axes.TOKEN_TYPE)(token_type_ids_BL)
    )
    h_BLD = init.layer_norm(c, name="layer_norm")(h_BLD)
    h_BLD = nn.Dropout(c.dropout_rate)(h_BLD, deterministic=deterministic)
    return h_BLD, tokens.embedding
