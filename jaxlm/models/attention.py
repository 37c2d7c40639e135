"""Multi-head attention with separate query and key/value inputs and an arbitrary mask.

Queries and keys/values are separate inputs and the mask is any `[batch, 1 or heads, q, k]`
boolean array, so the same module serves bidirectional encoders (padding mask), causal LMs
(triangular mask) and XLNet's two-stream attention (query stream over the content stream).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import init
from jaxlm.parallel import axes
from jaxlm.models.config import ModelConfig


class Projection(nn.Module):
  """`einsum(equation, x, kernel) + bias` with the kernel created at its full, named shape.

  (Flax's DenseGeneral initialises a flattened kernel and reshapes it, which clashes with
  logical names on a 3-d kernel.)
  """

  config: ModelConfig
  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kernel = self.param("kernel", init.weights(c, self.kernel_axes), self.kernel_shape,
                        c.param_dtype)
    bias_shape = self.kernel_shape[-len(self.bias_axes):]
    bias = self.param("bias", init.zeros(self.bias_axes), bias_shape, c.param_dtype)
    y = jnp.einsum(self.equation, x.astype(c.dtype), kernel.astype(c.dtype))
    return y + bias.astype(c.dtype)


class MultiHeadAttention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(
      self, q_BQD: jax.Array, kv_BKD: jax.Array, mask_BHQK: jax.Array, deterministic: bool
  ) -> jax.Array:
    c = self.config

    def project(name):
      return Projection(
          c,
          "bld,dhk->blhk",
          (c.hidden_size, c.num_heads, c.head_dim),
          (axes.EMBED, axes.HEADS, axes.KV),
          (axes.HEADS, axes.KV),
          name=name,
      )

    q_BQHK = project("query")(q_BQD) / jnp.sqrt(c.head_dim).astype(c.dtype)
    k_BKHK = project("key")(kv_BKD)
    v_BKHK = project("value")(kv_BKD)
    # Scores and softmax in float32 whatever the compute dtype: bf16 softmax loses mass.
    scores_BHQK = jnp.einsum("bqhd,bkhd->bhqk", q_BQHK, k_BKHK,
                             preferred_element_type=jnp.float32)
    scores_BHQK = jnp.where(mask_BHQK, scores_BHQK, jnp.finfo(jnp.float32).min)
    probs_BHQK = jax.nn.softmax(scores_BHQK, axis=-1).astype(c.dtype)
    probs_BHQK = nn.Dropout(c.attention_dropout_rate)(probs_BHQK, deterministic=deterministic)
    out_BQHK = jnp.einsum("bhqk,bkhd->bqhd", probs_BHQK, v_BKHK)
    out_BQHK = nn.with_logical_constraint(out_BQHK, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV))
    return Projection(
        c,
        "blhk,hkd->bld",
        (c.num_heads, c.head_dim, c.hidden_size),
        (axes.HEADS, axes.KV, axes.EMBED),
        (axes.EMBED,),
        name="out",
    )(out_BQHK)


def padding_mask(input_ids_BL: jax.Array, pad_id: int = 0) -> jax.Array:
  """`[B, 1, 1, L]`: every query may attend to every non-padding key."""
  return (input_ids_BL != pad_id)[:, None, None, :]


def causal_mask(input_ids_BL: jax.Array, pad_id: int = 0) -> jax.Array:
  """`[B, 1, L, L]`: position i attends to the non-padding keys j <= i (a causal LM)."""
  length = input_ids_BL.shape[1]
  earlier_LL = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  return padding_mask(input_ids_BL, pad_id) & earlier_LL[None, None]
