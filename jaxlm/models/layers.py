"""One Transformer layer: self-attention and an MLP (GELU, or gated: GEGLU / SwiGLU), post-LN
(BERT) or pre-LN."""

import flax.linen as nn
import jax

from jaxlm.models import dropout, init
from jaxlm.parallel import axes
from jaxlm.models.attention import MultiHeadAttention
from jaxlm.models.config import ModelConfig


# `model.mlp_activation` -> the activation; BERT's GELU is the exact (erf) one.
_ACTIVATIONS = {
    "gelu": dropout.gelu,
    "geglu": dropout.gelu,
    "swiglu": nn.silu,
}


def _identity(x: jax.Array) -> jax.Array:
  return x


class Mlp(nn.Module):
  """gelu: `wo(gelu(wi h))`. geglu / swiglu: `wo(act(wi_gate h) * wi_up h)`, two input
  projections of `mlp_dim` each (Shazeer 2020, "GLU variants improve Transformer")."""

  config: ModelConfig

  @nn.compact
  def __call__(self, h_BLD: jax.Array) -> jax.Array:
    c = self.config
    activation = _ACTIVATIONS[c.mlp_activation]
    if c.mlp_activation == "gelu":
      h_BLF = activation(init.dense(c, c.mlp_dim, (axes.EMBED, axes.MLP), "wi")(h_BLD))
    else:
      gate_BLF = init.dense(c, c.mlp_dim, (axes.EMBED, axes.MLP), "wi_gate")(h_BLD)
      up_BLF = init.dense(c, c.mlp_dim, (axes.EMBED, axes.MLP), "wi_up")(h_BLD)
      h_BLF = activation(gate_BLF) * up_BLF
    h_BLF = nn.with_logical_constraint(h_BLF, (axes.BATCH, axes.LENGTH, axes.MLP))
    return init.dense(c, c.hidden_size, (axes.MLP, axes.EMBED), "wo")(h_BLF)


class TransformerLayer(nn.Module):
  """Post-LN as in BERT (`x = LN(x + f(x))`), or pre-LN (`x = x + f(LN(x))`) when asked.

  Self-attention by default; given a `context`, the queries `x` attend over it instead. That is
  XLNet's query stream: the same layer (every weight shared) run on the query vectors `g` with
  the content stream `h` as keys and values.

  `attention_norm=False` (pre-LN only) leaves out the norm before attention: ModernBERT's layer 0,
  whose input, the embedding output, is normalised already.
  """

  config: ModelConfig
  attention_norm: bool = True

  @nn.compact
  def __call__(
      self,
      x_BLD: jax.Array,
      mask_BHQK: jax.Array,
      deterministic: bool,
      context_BKD: jax.Array | None = None,
      positions: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """`positions`: the query and key positions for relative attention (see attention.py)."""
    c = self.config
    attention = MultiHeadAttention(c, name="attention")
    mlp = Mlp(c, name="mlp")
    drop = dropout.Dropout(c.dropout_rate)
    if c.pre_layer_norm:
      attention_norm = init.norm(c, "attention_norm") if self.attention_norm else _identity
      h = attention_norm(x_BLD)
      kv = h if context_BKD is None else attention_norm(context_BKD)
      x_BLD = x_BLD + drop(attention(h, kv, mask_BHQK, deterministic, positions),
                           deterministic=deterministic)
      h = init.norm(c, "mlp_norm")(x_BLD)
      x_BLD = x_BLD + drop(mlp(h), deterministic=deterministic)
    else:
      kv = x_BLD if context_BKD is None else context_BKD
      h = attention(x_BLD, kv, mask_BHQK, deterministic, positions)
      x_BLD = init.norm(c, "attention_norm")(x_BLD + drop(h, deterministic=deterministic))
      x_BLD = init.norm(c, "mlp_norm")(x_BLD + drop(mlp(x_BLD), deterministic=deterministic))
    return nn.with_logical_constraint(x_BLD, (axes.BATCH, axes.LENGTH, axes.EMBED))
