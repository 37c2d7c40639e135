"""The typed model config: built once from `config.model`; modules never see a ConfigDict."""

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxlm.errors import UserError

REMAT_POLICIES = ("none", "full", "save_dots")
POSITION_ENCODINGS = ("absolute", "relative", "rope")
MLP_ACTIVATIONS = ("gelu", "geglu", "swiglu")
NORMS = ("layer_norm", "rms_norm")
# Keys whose value must be one of a few names, checked when the config loads.
_CHOICES = {
    "remat_policy": REMAT_POLICIES,
    "position_encoding": POSITION_ENCODINGS,
    "mlp_activation": MLP_ACTIVATIONS,
    "norm": NORMS,
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a BERT-style encoder. Variants come from `dataclasses.replace`."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_position: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pre_layer_norm: bool = False
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"  # none | full | save_dots: what a layer keeps for the backward pass.
  scan_layers: bool = False  # One nn.scan over layers: compile time flat in depth.
  # absolute: a learned position table added to the embeddings (BERT); relative: Transformer-XL
  # attention over sinusoidal query-key offsets (XLNet), no position table; rope: rotary
  # embeddings of queries and keys (RoFormer), no position table. One scheme at a time: rope
  # already gives every layer the positions, so a table beside it is not offered.
  position_encoding: str = "absolute"
  rope_theta: float = 10000.0  # RoPE's base: pair i of a head turns by theta^(-2i/head_dim).
  # gelu: `wo(gelu(wi x))` (BERT); geglu / swiglu: `wo(act(wi_gate x) * wi_up x)` with act gelu /
  # silu (Shazeer 2020). A gated MLP has 3 matrices: set mlp_dim (e.g. 2/3 of BERT's) to match
  # FLOPs.
  mlp_activation: str = "gelu"
  use_bias: bool = True  # False: no bias in any dense layer, LayerNorm or the vocabulary output.
  norm: str = "layer_norm"  # layer_norm | rms_norm (scale only, no mean); eps is layer_norm_eps.
  # True: the MLM / LM / PLM output projection is the token embedding table (BERT); False: its
  # own `output_embedding` table.
  tie_output_embedding: bool = True
  # True: BERT's dense -> GELU -> norm before the output projection; False: logits straight from
  # the encoder output.
  mlm_head_transform: bool = True

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> "ModelConfig":
    """Builds the dataclass from `config.model` (dtype names become jnp dtypes)."""
    values = dict(model)
    # A key absent from `model` (a run saved before the key existed) takes the dataclass default,
    # which is what that run computed.
    for key, choices in _CHOICES.items():
      value = values.get(key, getattr(cls, key))
      if value not in choices:
        raise UserError(f"model.{key} is '{value}'; use one of {choices}.")
    if values.get("position_encoding") == "rope" and (
        values["hidden_size"] // values["num_heads"]) % 2:
      raise UserError(f"model.position_encoding is 'rope' but the head size (hidden_size / "
                      f"num_heads = {values['hidden_size'] // values['num_heads']}) is odd: "
                      "rotary embeddings turn pairs of features. Use an even head size.")
    for key in ("dtype", "param_dtype"):
      if values[key] not in _DTYPES:
        raise UserError(f"model.{key} is '{values[key]}'; use one of {tuple(_DTYPES)}.")
      values[key] = _DTYPES[values[key]]
    return cls(**values)

