"""Multi-head attention with separate query and key/value inputs and an arbitrary mask.

Queries and keys/values are separate inputs and the mask is any `[batch, 1 or heads, q, k]`
boolean array, so the same module serves bidirectional encoders (padding mask), causal LMs
(triangular mask) and XLNet's two-stream attention (query stream over the content stream).

With `position_encoding="relative"` (Transformer-XL, as in XLNet) a score adds, to the content
term `(q + u) . k`, a position term `(q + v) . W_r r(i - j)` of sinusoidal encodings `r` of the
query-key offset, with learned per-head biases `u` (`content_bias`) and `v` (`position_bias`).

With `position_encoding="rope"` (RoFormer) queries and keys are turned by their positions before
the dot product (`rotary`), so a score depends on the query-key offset only; no parameters.

`model.attention_impl` picks how scores, softmax and values are computed: "einsum" (this file's
own einsums, with attention-probability dropout) or "xla" / "cudnn" through
`jax.nn.dot_product_attention`, which has no dropout (config load refuses a non-zero
`attention_dropout_rate` with them). The mask is passed as it is, a dense boolean array: cuDNN
turns it into an additive bias, so its flash kernel still reads a `[B, 1|H, Q, K]` array and
skips no masked block (the padding-by-lengths and `is_causal` forms it prefers are not derived
from jaxlm's arbitrary masks). Relative positions go in as `bias` with "xla"; with "cudnn" they
are refused (a dense trained bias per example is what flash attention avoids).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.errors import UserError
from jaxlm.models import dropout, init
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
  # None: no bias (Transformer-XL's position projection); `model.use_bias=False` drops it too.
  bias_axes: tuple[str, ...] | None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kernel = self.param("kernel", init.weights(c, self.kernel_axes), self.kernel_shape,
                        c.param_dtype)
    y = jnp.einsum(self.equation, x.astype(c.dtype), kernel.astype(c.dtype))
    if self.bias_axes is None or not c.use_bias:
      return y
    bias_shape = self.kernel_shape[-len(self.bias_axes):]
    bias = self.param("bias", init.zeros(self.bias_axes), bias_shape, c.param_dtype)
    return y + bias.astype(c.dtype)


class MultiHeadAttention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(
      self,
      q_BQD: jax.Array,
      kv_BKD: jax.Array,
      mask_BHQK: jax.Array,
      deterministic: bool,
      positions: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    """`positions`: `(q_positions_BQ, k_positions_BK)`, the original positions of the queries
    and keys, read by relative and rotary attention only; None means 0..Q-1 and 0..K-1 (then
    Q == K).

    A query whose mask row allows no key gets a zero attention output (then only the output
    bias), not the uniform average over every key that a plain masked softmax would give.
    """
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
    if c.position_encoding == "rope":
      if positions is None:
        positions = (jnp.arange(q_BQD.shape[1])[None], jnp.arange(kv_BKD.shape[1])[None])
      q_BQHK = rotary(q_BQHK, positions[0], c.rope_theta)
      k_BKHK = rotary(k_BKHK, positions[1], c.rope_theta)
    position_BHQK = None  # Relative positions: the score's position term, float32.
    if c.position_encoding == "relative":
      q_BQHK, position_BHQK = self._relative_terms(q_BQHK, k_BKHK, positions)
    if c.attention_impl == "einsum":
      out_BQHK = self._einsum_attention(q_BQHK, k_BKHK, v_BKHK, mask_BHQK, position_BHQK,
                                        deterministic)
    else:
      out_BQHK = self._fused_attention(q_BQHK, k_BKHK, v_BKHK, mask_BHQK, position_BHQK,
                                       deterministic)
    out_BQHK = nn.with_logical_constraint(out_BQHK, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.KV))
    return Projection(
        c,
        "blhk,hkd->bld",
        (c.num_heads, c.head_dim, c.hidden_size),
        (axes.HEADS, axes.KV, axes.EMBED),
        (axes.EMBED,),
        name="out",
    )(out_BQHK)

  def _einsum_attention(self, q_BQHK, k_BKHK, v_BKHK, mask_BHQK, position_BHQK,
                        deterministic: bool) -> jax.Array:
    """softmax(q . k (+ the position term), masked), dropped out, times v: `[B, Q, H, K]`."""
    c = self.config
    # Scores and softmax in float32 whatever the compute dtype: bf16 softmax loses mass.
    scores_BHQK = jnp.einsum("bqhd,bkhd->bhqk", q_BQHK, k_BKHK,
                             preferred_element_type=jnp.float32)
    if position_BHQK is not None:
      scores_BHQK = scores_BHQK + position_BHQK
    scores_BHQK = jnp.where(mask_BHQK, scores_BHQK, jnp.finfo(jnp.float32).min)
    probs_BHQK = jax.nn.softmax(scores_BHQK, axis=-1)
    # A row with no visible key (XLNet's first target when every other token is a target, a row
    # of padding) attends to nothing rather than to everything.
    probs_BHQK = jnp.where(jnp.any(mask_BHQK, axis=-1, keepdims=True), probs_BHQK, 0.0)
    probs_BHQK = probs_BHQK.astype(c.dtype)
    probs_BHQK = dropout.Dropout(c.attention_dropout_rate)(probs_BHQK, deterministic=deterministic)
    return jnp.einsum("bhqk,bkhd->bqhd", probs_BHQK, v_BKHK)

  def _fused_attention(self, q_BQHK, k_BKHK, v_BKHK, mask_BHQK, position_BHQK,
                       deterministic: bool) -> jax.Array:
    """The same attention through `jax.nn.dot_product_attention` ("xla" or "cudnn"): `[B, Q, H,
    K]`, with the einsum path's rule for a query row that sees no key (a zero output)."""
    c = self.config
    if not deterministic and c.attention_dropout_rate > 0:
      # Config load refuses this; a config changed after it (fine-tuning's dropout) lands here.
      raise UserError(
          f"model.attention_impl '{c.attention_impl}' has no attention-probability dropout but "
          f"attention_dropout_rate is {c.attention_dropout_rate}: set it to 0, or use "
          "attention_impl=einsum.")
    if c.attention_impl == "cudnn" and jax.default_backend() != "gpu":
      raise UserError(
          f"model.attention_impl is 'cudnn' (NVIDIA's flash attention) but JAX runs on "
          f"'{jax.default_backend()}': use attention_impl=xla (or einsum) off NVIDIA GPUs.")
    mask_BHQK = jnp.asarray(mask_BHQK, bool)
    # q arrives divided by sqrt(head_dim) (the einsum path's and the relative biases' scale).
    out_BQHK = jax.nn.dot_product_attention(
        q_BQHK, k_BKHK, v_BKHK, bias=position_BHQK, mask=mask_BHQK, scale=1.0,
        implementation=c.attention_impl)
    # The softmax of a row with every key masked is uniform over all keys: zero it instead.
    visible_BQH1 = jnp.any(mask_BHQK, axis=-1).transpose(0, 2, 1)[..., None]
    return jnp.where(visible_BQH1, out_BQHK, jnp.zeros((), out_BQHK.dtype))

  def _relative_terms(self, q_BQHK, k_BKHK, positions) -> tuple[jax.Array, jax.Array]:
    """Transformer-XL's score `(q + u) . k + (q + v) . W_r r(i - j)` as its two pieces: the
    content term's queries `q + u` (`[B, Q, H, K]`, the compute dtype) and the position term
    (float32 `[B, H, Q, K]`), which the attention adds to the scores (or passes as `bias`).

    The position term is computed once per query against all 2K offsets, then each key picks
    its offset: by the relative shift (a reshape) when positions are 0..K-1, by a gather when
    they are given (a permuted sequence, the query stream's targets).
    """
    c = self.config
    head_axes = (axes.HEADS, axes.KV)
    content_bias_HK = self.param("content_bias", init.zeros(head_axes),
                                 (c.num_heads, c.head_dim), c.param_dtype)
    position_bias_HK = self.param("position_bias", init.zeros(head_axes),
                                  (c.num_heads, c.head_dim), c.param_dtype)
    scale = 1.0 / jnp.sqrt(c.head_dim).astype(c.dtype)  # q arrives scaled; so do its biases.
    length = k_BKHK.shape[1]
    r_RHK = Projection(c, "rd,dhk->rhk", (c.hidden_size, c.num_heads, c.head_dim),
                       (axes.EMBED, axes.HEADS, axes.KV), None, name="position")(
                           sinusoidal_offsets(length, c.hidden_size))
    content_q_BQHK = q_BQHK + scale * content_bias_HK.astype(c.dtype)
    position_BHQR = jnp.einsum("bqhd,rhd->bhqr", q_BQHK + scale * position_bias_HK.astype(c.dtype),
                               r_RHK, preferred_element_type=jnp.float32)
    if positions is None:
      return content_q_BQHK, relative_shift(position_BHQR)
    q_positions_BQ, k_positions_BK = positions
    # Row r of the table holds offset K - r.
    index_BQK = length - (q_positions_BQ[:, :, None] - k_positions_BK[:, None, :])
    # One index per (example, query, key), shared by the heads: mapped over heads rather than
    # broadcast, so no [B, H, Q, K] index array is built (the broadcast costs ~40% more memory).
    pick = jax.vmap(lambda x_QR, i_QK: jnp.take_along_axis(x_QR, i_QK, axis=-1),
                    in_axes=(0, None))
    return content_q_BQHK, jax.vmap(pick)(position_BHQR, index_BQK)


def rotary(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding: the feature pair `(i, i + K/2)` of every head, at position m,
  turned by the angle `m * theta^(-2i/K)` (the rotate-half layout of GPT-NeoX and Hugging Face's
  ModernBert). A rotation keeps norms, and `rotary(q, m) . rotary(k, n)` depends on `n - m`
  only. Computed in float32; `positions_BL` may have a batch of 1 (broadcast).
  """
  half = x_BLHK.shape[-1] // 2
  inverse_frequencies_F = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / (2 * half))
  angles_BLF = positions_BL.astype(jnp.float32)[..., None] * inverse_frequencies_F
  cos_BL1F, sin_BL1F = jnp.cos(angles_BLF)[:, :, None], jnp.sin(angles_BLF)[:, :, None]
  x = x_BLHK.astype(jnp.float32)
  first, second = x[..., :half], x[..., half:]
  turned = jnp.concatenate([first * cos_BL1F - second * sin_BL1F,
                            first * sin_BL1F + second * cos_BL1F], axis=-1)
  return turned.astype(x_BLHK.dtype)


def sinusoidal_offsets(length: int, width: int) -> jax.Array:
  """`[2 * length, width]` sinusoidal encodings of the offsets length, length - 1, ..., 1 - length
  (Transformer-XL's, sin half then cos half); a constant XLA folds away."""
  offsets_R = jnp.arange(length, -length, -1, dtype=jnp.float32)
  inverse_frequencies = 1.0 / (10000.0 ** (jnp.arange(0, width, 2, dtype=jnp.float32) / width))
  angles_RF = offsets_R[:, None] * inverse_frequencies[None, :]
  return jnp.concatenate([jnp.sin(angles_RF), jnp.cos(angles_RF)], axis=-1)


def relative_shift(x_BHQR: jax.Array) -> jax.Array:
  """`out[..., i, j] = x[..., i, K - i + j]` for `R = 2K` offsets and `Q == K` queries: each
  query's scores against the offsets, re-indexed by key, with one reshape and no gather.

  Flattened, element (i, K - i + j) sits at i * (2K - 1) + K + j: dropping the first K elements
  and reading rows of 2K - 1 lines every query up at its key 0.
  """
  *lead, queries, offsets = x_BHQR.shape
  length = offsets // 2
  if queries != length:
    raise ValueError(f"relative_shift needs as many queries as keys: {queries} vs {length}")
  flat = x_BHQR.reshape(*lead, queries * offsets)[..., length:]
  return flat.reshape(*lead, queries, offsets - 1)[..., :length]


def padding_mask(input_ids_BL: jax.Array, pad_id: int = 0) -> jax.Array:
  """`[B, 1, 1, L]`: every query may attend to every non-padding key."""
  return (input_ids_BL != pad_id)[:, None, None, :]


def example_mask(example_ids_BL: jax.Array) -> jax.Array:
  """`[B, 1, L, L]`: in a packed row (`data.pack_examples`), position i attends to the keys of
  its own example only; `example_ids` is 1..K per example and 0 on padding."""
  same_BLL = example_ids_BL[:, :, None] == example_ids_BL[:, None, :]
  return (same_BLL & (example_ids_BL[:, None, :] > 0))[:, None]


def two_stream_masks(length: int, num_targets: int) -> tuple[jax.Array, jax.Array]:
  """XLNet's visibility for a physically permuted sequence (MPNet's layout): the `L - P`
  non-targets first, then the `P` targets in factorisation order.

  Content stream `[1, 1, L, L]`: a non-target sees the non-targets; a target sees them, the
  targets before it and itself. Query stream `[1, 1, P, L]`: target t sees the non-targets and
  the targets before it, never itself. Both depend only on `(L, P)`, the same for every example,
  so they are constants of the compiled step (padding is a separate `[B, 1, 1, L]` mask).
  """
  first_target = length - num_targets
  key_L = jnp.arange(length)
  content_LL = key_L[None, :] < jnp.maximum(first_target, key_L[:, None] + 1)
  query_PL = key_L[None, :] < (first_target + jnp.arange(num_targets))[:, None]
  return content_LL[None, None], query_PL[None, None]


def causal_mask(input_ids_BL: jax.Array, pad_id: int = 0) -> jax.Array:
  """`[B, 1, L, L]`: position i attends to the non-padding keys j <= i (a causal LM)."""
  length = input_ids_BL.shape[1]
  earlier_LL = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  return padding_mask(input_ids_BL, pad_id) & earlier_LL[None, None]
