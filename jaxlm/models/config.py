"""The typed model config: built once from `config.model`; modules never see a ConfigDict."""

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxlm.errors import UserError

REMAT_POLICIES = ("none", "full", "save_dots")
POSITION_ENCODINGS = ("absolute", "relative")
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
  # attention over sinusoidal query-key offsets (XLNet), no position table.
  position_encoding: str = "absolute"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_config(cls, model: ml_collections.ConfigDict) -> "ModelConfig":
    """Builds the dataclass from `config.model` (dtype names become jnp dtypes)."""
    values = dict(model)
    if values["remat_policy"] not in REMAT_POLICIES:
      raise UserError(
          f"model.remat_policy is '{values['remat_policy']}'; use one of {REMAT_POLICIES}."
      )
    if values["position_encoding"] not in POSITION_ENCODINGS:
      raise UserError(f"model.position_encoding is '{values['position_encoding']}'; use one of "
                      f"{POSITION_ENCODINGS}.")
    for key in ("dtype", "param_dtype"):
      if values[key] not in _DTYPES:
        raise UserError(f"model.{key} is '{values[key]}'; use one of {tuple(_DTYPES)}.")
      values[key] = _DTYPES[values[key]]
    return cls(**values)

