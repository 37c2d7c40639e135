"""The BERT encoder: embeddings, N Transformer layers, and the [CLS] pooler."""

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
  pooled_BD: jax.Array  # tanh(dense(h[CLS])), BERT's sentence representation.
  token_table_VD: jax.Array  # The token embedding table, for heads tied to it.


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


class _ScanStep(nn.Module):
  """One layer in the (carry, output) form nn.scan wants."""

  config: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, h_BLD: jax.Array, mask_BHQK: jax.Array):
    layer = _layer_class(self.config)(self.config, name="layer")
    return layer(h_BLD, mask_BHQK, self.deterministic), None


def _layers(c: ModelConfig, h_BLD, mask_BHQK, deterministic: bool) -> jax.Array:
  """The layer stack: a Python loop (`layer_i`), or one nn.scan (`layers`, stacked params)."""
  if not c.scan_layers:
    for i in range(c.num_layers):
      h_BLD = _layer_class(c)(c, name=f"layer_{i}")(h_BLD, mask_BHQK, deterministic)
    return h_BLD
  scan = nn.scan(
      _ScanStep,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast,),
      length=c.num_layers,
      metadata_params={nn.PARTITION_NAME: axes.LAYERS},
  )
  h_BLD, _ = scan(c, deterministic, name="layers")(h_BLD, mask_BHQK)
  return h_BLD


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
  ) -> EncoderOutput:
    """`mask_BHQK` defaults to the padding mask (`causal`: and no key after the query)."""
    c = self.config
    if mask_BHQK is None:
      mask_BHQK = causal_mask(input_ids_BL) if causal else padding_mask(input_ids_BL)
    h_BLD, table_VD = Embeddings(c, name="embeddings")(
        input_ids_BL, token_type_ids_BL, deterministic
    )
    h_BLD = nn.with_logical_constraint(h_BLD, (axes.BATCH, axes.LENGTH, axes.EMBED))
    h_BLD = _layers(c, h_BLD, mask_BHQK, deterministic)
    if c.pre_layer_norm:
      h_BLD = init.layer_norm(c, "final_norm")(h_BLD)
    pooled_BD = init.dense(c, c.hidden_size, (axes.EMBED, axes.EMBED_OUT), "pooler")(h_BLD[:, 0])
    return EncoderOutput(h_BLD, jnp.tanh(pooled_BD), table_VD)
