"""jaxlm: pretrain Transformer encoders (MLM, NSP, ...) in JAX/Flax on any device mesh."""

__version__ = "0.1.0"
