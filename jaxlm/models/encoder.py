"""The BERT encoder: embeddings, N Transformer layers, and the [CLS] pooler; optionally with
XLNet's query stream beside the content stream (two-stream attention)."""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlm.models import init
from jaxlm.parallel import axes
from jaxlm.models.attention import causal_mask, padding_mask
from jaxlm.models.config import ModelConfig
from jaxlm.models.embeddings import Embeddings
from jaxlm.models.layers import TransformerLayer


@flax.struct.dataclass
class EncoderOutput:
  sequence_BLD: jax.Array  # Final hidden states.
  pooled_BD: jax.Array  # tanh(dense(h[CLS])), BERT's sentence representation ([B, K, D] packed).
  token_table_VD: jax.Array  # The token embedding table, for heads tied to it.
  query_BPD: jax.Array | None = None  # The query stream's final states (two-stream runs only).


@flax.struct.dataclass
class QueryStream:
  """Where XLNet's query stream runs and what it may see.

  One query per predicted token: it starts from a learned vector plus its token's position
  information, never its token, and attends over the content stream through `mask_BHPK`
  (`[B or 1, 1, P, L]`). Every layer weight is the content stream's.
  """

  mask_BHPK: jax.Array
  positions_BP: jax.Array  # Original positions of the predicted tokens.
  token_type_ids_BP: jax.Array


_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
}


def _layer_class(config: ModelConfig) -> type[nn.Module]:
  """TransformerLayer, wrapped in nn.remat with the configured policy."""
  if config.remat_policy == "none":
    return TransformerLayer
  # static_argnums counts `self` as 0: `deterministic` (argument 3) is a Python bool.
  return nn.remat(TransformerLayer, policy=_POLICIES[config.remat_policy], static_argnums=(3,))


def _apply_layer(layer, h_BLD, g_BPD, views, deterministic: bool):
  """One layer on both streams: the query stream reads this layer's input content stream."""
  mask_BHQK, content_positions, query_mask_BHPK, query_positions = views
  if g_BPD is not None:
    g_BPD = layer(g_BPD, query_mask_BHPK, deterministic, h_BLD, query_positions)
  return layer(h_BLD, mask_BHQK, deterministic, None, content_positions), g_BPD


class _ScanStep(nn.Module):
  """One layer in the (carry, output) form nn.scan wants; the carry is both streams."""

  config: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, streams, views):
    layer = _layer_class(self.config)(self.config, name="layer")
    return _apply_layer(layer, *streams, views, self.deterministic), None


def _layers(c: ModelConfig, h_BLD, g_BPD, views, deterministic: bool):
  """The layer stack: a Python loop (`layer_i`), or one nn.scan (`layers`, stacked params).

  `views` = (content mask, content positions, query mask, query positions); the query parts and
  `g_BPD` are None without a query stream.
  """
  if not c.scan_layers:
    for i in range(c.num_layers):
      # ModernBERT's layer 0 may go without its attention norm (ModelConfig refuses that with
      # scan_layers, whose layers share one structure).
      layer = _layer_class(c)(c, attention_norm=i > 0 or c.first_layer_attention_norm,
                              name=f"layer_{i}")
      h_BLD, g_BPD = _apply_layer(layer, h_BLD, g_BPD, views, deterministic)
    return h_BLD, g_BPD
  scan = nn.scan(
      _ScanStep,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,),
      length=c.num_layers,
      metadata_params={nn.PARTITION_NAME: axes.LAYERS},
  )
  (h_BLD, g_BPD), _ = scan(c, deterministic, name="layers")((h_BLD, g_BPD), views)
  return h_BLD, g_BPD


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
      causal: bool = False,
      position_ids_BL: jax.Array | None = None,
      query: QueryStream | None = None,
      cls_positions_BK: jax.Array | None = None,
  ) -> EncoderOutput:
    """`mask_BHQK` defaults to the padding mask (`causal`: and no key after the query).

    `position_ids_BL`: the original positions when the sequence is physically permuted (PLM),
    or each example's own positions in a packed row; `query`: run XLNet's query stream too
    (`EncoderOutput.query_BPD`); `cls_positions_BK`: pool at these K positions of each row (the
    [CLS] of each example of a packed row), `pooled_BD` then `[B, K, D]`.
    """
    c = self.config
    if mask_BHQK is None:
      mask_BHQK = causal_mask(input_ids_BL) if causal else padding_mask(input_ids_BL)
    embeddings = Embeddings(c, name="embeddings")
    h_BLD, table_VD = embeddings(input_ids_BL, token_type_ids_BL, deterministic, position_ids_BL)
    h_BLD = nn.with_logical_constraint(h_BLD, (axes.BATCH, axes.LENGTH, axes.EMBED))
    content_positions = None if position_ids_BL is None else (position_ids_BL, position_ids_BL)
    g_BPD = query_mask_BHPK = query_positions = None
    if query is not None:
      # One learned vector, not decayed (optimizer.py), in place of every query's token.
      start_D = self.param("query_start", init.weights(c, (axes.EMBED,)), (c.hidden_size,),
                           c.param_dtype)
      start_BPD = jnp.broadcast_to(start_D.astype(c.dtype),
                                   query.positions_BP.shape + (c.hidden_size,))
      g_BPD, _ = embeddings(None, query.token_type_ids_BP, deterministic, query.positions_BP,
                            start_BPD)
      key_positions_BL = position_ids_BL if position_ids_BL is not None else jnp.broadcast_to(
          jnp.arange(input_ids_BL.shape[1]), input_ids_BL.shape)
      query_mask_BHPK, query_positions = query.mask_BHPK, (query.positions_BP, key_positions_BL)
    views = (mask_BHQK, content_positions, query_mask_BHPK, query_positions)
    h_BLD, g_BPD = _layers(c, h_BLD, g_BPD, views, deterministic)
    if c.pre_layer_norm:
      final_norm = init.norm(c, "final_norm")
      h_BLD = final_norm(h_BLD)
      g_BPD = None if g_BPD is None else final_norm(g_BPD)
    first_BD = (h_BLD[:, 0] if cls_positions_BK is None
                else jnp.take_along_axis(h_BLD, cls_positions_BK[..., None], axis=1))
    pooled_BD = init.dense(c, c.hidden_size, (axes.EMBED, axes.EMBED_OUT), "pooler")(first_BD)
    return EncoderOutput(h_BLD, jnp.tanh(pooled_BD), table_VD, g_BPD)
