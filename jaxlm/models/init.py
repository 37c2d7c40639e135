"""Initialisers that carry logical axis names, so every parameter is born partitionable."""

import flax.linen as nn

from jaxlm.parallel import axes
from jaxlm.models.config import ModelConfig


def weights(config: ModelConfig, names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  """BERT's truncated normal (stddev `initializer_range`), named with logical axes."""
  return nn.with_logical_partitioning(
      nn.initializers.truncated_normal(stddev=config.initializer_range), names
  )


def zeros(names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones(names: tuple[str | None, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def layer_norm(config: ModelConfig, name: str | None = None) -> nn.LayerNorm:
  """A LayerNorm over the hidden axis with named scale and bias."""
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      scale_init=ones((axes.EMBED,)),
      bias_init=zeros((axes.EMBED,)),
      name=name,
  )


def dense(config: ModelConfig, features: int, names: tuple[str, str], name: str) -> nn.Dense:
  """A Dense layer with a BERT-initialised kernel named `names` (in, out) and a zero bias."""
  return nn.Dense(
      features,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=weights(config, names),
      bias_init=zeros((names[1],)),
      name=name,
  )
