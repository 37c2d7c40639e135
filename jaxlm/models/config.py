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
ATTENTION_IMPLS = ("einsum", "xla", "cudnn")
# Keys whose value must be one of a few names, checked when the config loads.
_CHOICES = {
    "remat_policy": REMAT_POLICIES,
    "position_encoding": POSITION_ENCODINGS,
    "mlp_activation": MLP_ACTIVATIONS,
    "norm": NORMS,
    "attention_impl": ATTENTION_IMPLS,
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
  # Rows of the token-type (segment) table; 0: no table at all and token_type_ids are ignored
  # (ModernBERT: its embeddings are the tokens alone).
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  pre_layer_norm: bool = False
  # Pre-LN only. False: layer 0 has no norm before its attention, which then reads the embedding
  # output as it is (ModernBERT: the embeddings end in a norm already, so a second one is
  # redundant). Needs scan_layers=False: scanned layers share one parameter structure.
  first_layer_attention_norm: bool = True
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
  # einsum: jaxlm's own attention einsums (with attention dropout); xla / cudnn:
  # jax.nn.dot_product_attention with that implementation (no attention dropout; cudnn: NVIDIA
  # GPUs, bf16/fp16, head size a multiple of 8). See models/attention.py.
  attention_impl: str = "einsum"

  def __post_init__(self):
    # Here rather than in `from_config`, so that a config built directly (tests, `import_hf`)
    # is refused too rather than failing inside nn.scan.
    if self.type_vocab_size < 0:
      raise UserError(f"model.type_vocab_size is {self.type_vocab_size}; use 0 (no token-type "
                      "table) or a positive number of segment types (2 in BERT).")
    if self.scan_layers and self.pre_layer_norm and not self.first_layer_attention_norm:
      raise UserError(
          "model.first_layer_attention_norm is False with model.scan_layers=True: scanned layers "
          "share one parameter structure, so layer 0 cannot be the only one without an attention "
          "norm. Set model.scan_layers=False (or model.first_layer_attention_norm=True).")

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
    _check_attention_impl(values)
    for key in ("dtype", "param_dtype"):
      if values[key] not in _DTYPES:
        raise UserError(f"model.{key} is '{values[key]}'; use one of {tuple(_DTYPES)}.")
      values[key] = _DTYPES[values[key]]
    return cls(**values)


def _check_attention_impl(values: dict) -> None:
  """The combinations `jax.nn.dot_product_attention` cannot run, refused at load with the fix."""
  impl = values.get("attention_impl", ModelConfig.attention_impl)
  if impl == "einsum":
    return
  dropout = values.get("attention_dropout_rate", ModelConfig.attention_dropout_rate)
  if dropout > 0:
    raise UserError(f"model.attention_impl is '{impl}', which has no dropout on attention "
                    f"probabilities, but model.attention_dropout_rate is {dropout}: set "
                    "--config.model.attention_dropout_rate=0, or use attention_impl=einsum.")
  if impl != "cudnn":
    return
  if values.get("position_encoding", ModelConfig.position_encoding) == "relative":
    raise UserError("model.attention_impl 'cudnn' does not take position_encoding 'relative' "
                    "(its position term is a dense per-example bias, what flash attention "
                    "avoids): use attention_impl=xla or einsum, or another position_encoding.")
  dtype = values.get("dtype", "float32")
  if dtype not in ("bfloat16", "float16"):
    raise UserError(f"model.attention_impl 'cudnn' runs in bfloat16 or float16 only, but "
                    f"model.dtype is '{dtype}': set --config.model.dtype=bfloat16.")
  head_dim = values["hidden_size"] // values["num_heads"]
  if head_dim % 8:
    raise UserError(f"model.attention_impl 'cudnn' needs a head size (hidden_size / num_heads) "
                    f"that is a multiple of 8, not {head_dim}: use attention_impl=xla, or "
                    "change hidden_size or num_heads.")
