"""Token, position and token-type embeddings, summed, normalised and dropped out (BERT).

With relative or rotary position encoding the position table is left out: attention carries
positions. With `type_vocab_size=0` the token-type table is left out and token types are ignored
(ModernBERT embeds the tokens alone).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import dropout, init
from jaxlm.parallel import axes
from jaxlm.models.config import ModelConfig


class Embeddings(nn.Module):
  """Returns `(h_BLD, token_table_VD)`; the table is handed on for the tied MLM output.

  `position_ids_BL` (default 0..L-1) are the original positions of a physically permuted
  sequence (PLM). `token_embeddings_BLD`, when given, replaces the token lookup: the query
  stream starts from one learned vector instead of its (hidden) tokens.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
      self,
      input_ids_BL: jax.Array,
      token_type_ids_BL: jax.Array,
      deterministic: bool,
      position_ids_BL: jax.Array | None = None,
      token_embeddings_BLD: jax.Array | None = None,
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
    if token_embeddings_BLD is None:
      token_embeddings_BLD = tokens(input_ids_BL)
    h_BLD = token_embeddings_BLD
    if c.position_encoding == "absolute":
      if position_ids_BL is None:
        position_ids_BL = jnp.broadcast_to(jnp.arange(input_ids_BL.shape[1]), input_ids_BL.shape)
      h_BLD = h_BLD + table("position", c.max_position, axes.POSITION)(position_ids_BL)
    if c.type_vocab_size:
      h_BLD = h_BLD + table("token_type", c.type_vocab_size, axes.TOKEN_TYPE)(token_type_ids_BL)
    h_BLD = init.norm(c, name="layer_norm")(h_BLD)
    h_BLD = dropout.Dropout(c.dropout_rate)(h_BLD, deterministic=deterministic)
    return h_BLD, tokens.embedding
