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


def norm(config: ModelConfig, name: str | None = None) -> nn.Module:
  """The configured norm over the hidden axis (`model.norm`), its parameters named: LayerNorm's
  `scale` and `bias` (no bias when `model.use_bias` is False), or RMSNorm's `scale`."""
  if config.norm == "rms_norm":
    return nn.RMSNorm(
        epsilon=config.layer_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=ones((axes.EMBED,)),
        name=name,
    )
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      use_bias=config.use_bias,
      scale_init=ones((axes.EMBED,)),
      bias_init=zeros((axes.EMBED,)),
      name=name,
  )


def dense(config: ModelConfig, features: int, names: tuple[str, str], name: str) -> nn.Dense:
  """A Dense layer with a BERT-initialised kernel named `names` (in, out) and a zero bias (none
  when `model.use_bias` is False)."""
  return nn.Dense(
      features,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      use_bias=config.use_bias,
      kernel_init=weights(config, names),
      bias_init=zeros((names[1],)),
      name=name,
  )
