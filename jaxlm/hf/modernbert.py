"""Hugging Face's ModernBert, for jaxlm models with rotary positions.

ModernBert computes jaxlm's modern encoder when the run has ModernBERT's layout (`check`: pre-LN
with LayerNorms, a gated MLP, no token types and no norm before layer 0's attention, the MLM
head's transform), with every layer global attention at the run's rotary theta. Its weights
(`entries`) differ from BERT's in names and in fusing: query, key and value kernels are fused
into `Wqkv` (rows q, k, v, heads major), `wi_gate` and `wi_up` into `Wi` (rows: the activated
half, then the multiplier); it has no position or token-type table, no pooler and no NSP head.
`hf_config` writes the transformers config of an export; `model_overrides` reads one back,
refusing what jaxlm does not compute (an activation other than the exact GELU, or SiLU in the
MLP; ModernBERT's sliding-window layers, unless their window spans every position at the global
theta; a rotary type other than the default; biases on in some layers and off in others).
`convert.py` chooses the family and calls these.
"""

from collections.abc import Mapping
from typing import Any

from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from jaxlm.errors import UserError
from jaxlm.hf.mapping import (EXACT_GELU, Entry, Family, Fused, Mapped, dense, lm_head_entries,
                              norm_entries, same)
from jaxlm.models.config import ModelConfig

# ModernBert's head is `decoder(norm(gelu(dense(h))))`; `decoder.weight` is the token table
# unless untied, when it is the head's own `output_embedding`.
_LM = {"transform/kernel": "head.dense.weight", "transform/bias": "head.dense.bias",
       "layer_norm/scale": "head.norm.weight", "layer_norm/bias": "head.norm.bias",
       "bias": "decoder.bias", "output_embedding": "decoder.weight"}

MODERNBERT = Family("modernbert", "model.", True, False, _LM, None,
                    {"mlm": "ModernBertForMaskedLM", "": "ModernBertModel"})
# The key of the token table inside the base model.
TOKEN_TABLE = "embeddings.tok_embeddings.weight"

# jaxlm's gated MLPs as ModernBert's `hidden_activation` (its MLP is `act(input) * gate`).
_GATED_ACTIVATION = {"geglu": "gelu", "swiglu": "silu"}
_SILU = ("silu", "swish")


def entries(c: ModelConfig, prefix: str, lm_head: str | None) -> list[Mapped]:
  """Every jaxlm leaf a ModernBert holds (it has no position or token-type table, no pooler and
  no NSP head; layer 0 no attention norm), with its key; the base model's keys start with
  `prefix`."""
  d, h, k = c.hidden_size, c.num_heads, c.head_dim
  bias = c.use_bias
  result = [Entry(("encoder", "embeddings", "token", "embedding"), f"{prefix}{TOKEN_TABLE}",
                  same, same),
            *norm_entries(("encoder", "embeddings", "layer_norm"), f"{prefix}embeddings.norm",
                          bias)]
  for i in range(c.num_layers):
    ours, theirs = ("encoder", f"layer_{i}"), f"{prefix}layers.{i}."
    attention, mlp = ours + ("attention",), ours + ("mlp",)
    qkv = tuple(attention + (name,) for name in ("query", "key", "value"))
    gated = (mlp + ("wi_gate",), mlp + ("wi_up",))  # HF's `input` (activated), then `gate`.
    result += [
        Fused(tuple(p + ("kernel",) for p in qkv), f"{theirs}attn.Wqkv.weight",
              lambda x: x.reshape(d, h * k).T, lambda w: w.T.reshape(d, h, k)),
        Entry(attention + ("out", "kernel"), f"{theirs}attn.Wo.weight",
              lambda x: x.reshape(h * k, d).T, lambda w: w.T.reshape(h, k, d)),
        Fused(tuple(p + ("kernel",) for p in gated), f"{theirs}mlp.Wi.weight",
              lambda x: x.T, lambda w: w.T),
        dense(mlp + ("wo", "kernel"), f"{theirs}mlp.Wo.weight"),
        *norm_entries(ours + ("mlp_norm",), f"{theirs}mlp_norm", bias),
    ]
    if i:  # Layer 0 reads the normalised embeddings (check).
      result += norm_entries(ours + ("attention_norm",), f"{theirs}attn_norm", bias)
    if bias:
      result += [
          Fused(tuple(p + ("bias",) for p in qkv), f"{theirs}attn.Wqkv.bias",
                lambda x: x.reshape(h * k), lambda w: w.reshape(h, k)),
          Entry(attention + ("out", "bias"), f"{theirs}attn.Wo.bias", same, same),
          Fused(tuple(p + ("bias",) for p in gated), f"{theirs}mlp.Wi.bias", same, same),
          Entry(mlp + ("wo", "bias"), f"{theirs}mlp.Wo.bias", same, same),
      ]
  result += norm_entries(("encoder", "final_norm"), f"{prefix}final_norm", bias)
  if lm_head:
    result += lm_head_entries(c, MODERNBERT, lm_head)
  return result


# `(key, the value ModernBert computes, why)` for a rotary model; mlp_activation is checked apart.
_NEEDS = (
    ("pre_layer_norm", True, "ModernBert is pre-LN"),
    ("first_layer_attention_norm", False, "its layer 0 has no norm before attention"),
    ("type_vocab_size", 0, "it has no token-type embedding"),
    ("norm", "layer_norm", "its norms are LayerNorms"),
    ("mlm_head_transform", True, "its MLM head always has the dense + GELU + norm transform"),
)


def check(c: ModelConfig) -> None:
  """A rotary model exports to ModernBert: every difference from its layout, named at once."""
  problems = [f"model.{key} is {getattr(c, key)!r} (export needs model.{key}={want!r}: {why})"
              for key, want, why in _NEEDS if getattr(c, key) != want]
  if c.mlp_activation not in _GATED_ACTIVATION:
    problems.append(f"model.mlp_activation is {c.mlp_activation!r} (export needs "
                    "model.mlp_activation='geglu' or 'swiglu': ModernBert's MLP is gated)")
  if problems:
    raise UserError(
        "model.position_encoding is 'rope', so this run would export to Hugging Face's "
        f"ModernBert, which cannot compute it: {'; '.join(problems)}. Export a run trained with "
        "those values (the ModernBERT layout, configs/models.py).")


def hf_config(c: ModelConfig, architecture: str):
  """ModernBert computing jaxlm's function: every layer global attention with jaxlm's theta
  (ModernBERT's own alternate sliding-window layers, with another theta), every bias as
  `use_bias`, GELU or SiLU gating."""
  import transformers

  return transformers.ModernBertConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim,
      hidden_activation=_GATED_ACTIVATION[c.mlp_activation],
      classifier_activation="gelu",  # The MLM head's transform: the exact GELU, as jaxlm's.
      layer_types=["full_attention"] * c.num_layers, global_attn_every_n_layers=1,
      global_rope_theta=c.rope_theta, local_rope_theta=c.rope_theta,
      max_position_embeddings=c.max_position, initializer_range=c.initializer_range,
      norm_eps=c.layer_norm_eps, norm_bias=c.use_bias, attention_bias=c.use_bias,
      mlp_bias=c.use_bias, classifier_bias=c.use_bias, decoder_bias=c.use_bias,
      embedding_dropout=c.dropout_rate, mlp_dropout=c.dropout_rate,
      attention_dropout=c.attention_dropout_rate,
      pad_token_id=PAD_ID, cls_token_id=CLS_ID, sep_token_id=SEP_ID, bos_token_id=CLS_ID,
      eos_token_id=SEP_ID, tie_word_embeddings=c.tie_output_embedding,
      architectures=[architecture], dtype="float32",
  )


def model_overrides(config: Mapping[str, Any], where: str) -> dict[str, Any]:
  """`model_overrides` of a ModernBert config: jaxlm computes it when every layer attends
  globally with one rotary theta and every bias is on or every bias is off. transformers 4.x
  wrote `global_rope_theta` and `global_attn_every_n_layers`, 5.x `rope_parameters` and
  `layer_types`: both are read, with ModernBertConfig's defaults."""
  for key, default in (("hidden_activation", "gelu"), ("classifier_activation", "gelu")):
    value = config.get(key, default)
    if value not in EXACT_GELU and (key == "classifier_activation" or value not in _SILU):
      wants = "'gelu'" + (" or 'silu'" if key == "hidden_activation" else "")
      raise UserError(f"{key} is '{value}'{where}; jaxlm computes {wants} there (the exact "
                      "GELU, or SiLU for a SwiGLU MLP), so this model cannot be imported.")
  layers = config["num_hidden_layers"]
  every = config.get("global_attn_every_n_layers", 3)
  layer_types = config.get("layer_types") or [
      "sliding_attention" if i % every else "full_attention" for i in range(layers)]
  thetas = {}
  for layer_type, legacy, default in (("full_attention", "global_rope_theta", 160000.0),
                                      ("sliding_attention", "local_rope_theta", 10000.0)):
    rope = (config.get("rope_parameters") or {}).get(layer_type) or {}
    if rope.get("rope_type", "default") != "default":
      raise UserError(f"rope_parameters.{layer_type}.rope_type is '{rope['rope_type']}'{where}; "
                      "jaxlm computes the default rotary embedding only.")
    thetas[layer_type] = float(rope.get("rope_theta", config.get(legacy, default)))
  positions = config.get("max_position_embeddings", 8192)
  if "sliding_attention" in layer_types and (
      config.get("local_attention", 128) // 2 < positions
      or thetas["sliding_attention"] != thetas["full_attention"]):
    raise UserError(
        f"layer_types holds sliding_attention layers{where} (a window of "
        f"{config.get('local_attention', 128)} tokens, rotary theta "
        f"{thetas['sliding_attention']}); jaxlm computes global attention with one theta only, "
        "so this model cannot be imported.")
  biases = {key: config.get(key, default) for key, default in (
      ("attention_bias", False), ("mlp_bias", False), ("norm_bias", False),
      ("classifier_bias", False), ("decoder_bias", True))}
  if len(set(biases.values())) > 1:
    raise UserError(f"The bias flags{where} differ ({biases}); jaxlm's model.use_bias puts a "
                    "bias in every layer or in none, so this model cannot be imported.")
  return dict(
      vocab_size=config["vocab_size"],
      hidden_size=config["hidden_size"],
      num_layers=config["num_hidden_layers"],
      num_heads=config["num_attention_heads"],
      mlp_dim=config["intermediate_size"],
      max_position=positions,
      type_vocab_size=0,
      dropout_rate=config.get("embedding_dropout", 0.0),
      attention_dropout_rate=config.get("attention_dropout", 0.0),
      pre_layer_norm=True,
      first_layer_attention_norm=False,
      layer_norm_eps=config.get("norm_eps", 1e-5),
      initializer_range=config.get("initializer_range", 0.02),
      position_encoding="rope",
      rope_theta=thetas["full_attention"],
      mlp_activation="swiglu" if config.get("hidden_activation", "gelu") in _SILU else "geglu",
      use_bias=biases["attention_bias"],
      norm="layer_norm",
      tie_output_embedding=config.get("tie_word_embeddings", True),
      mlm_head_transform=True,
  )
