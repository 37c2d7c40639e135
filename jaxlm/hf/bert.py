"""The BERT family of Hugging Face models: BERT (post-LN), RoBERTa (post-LN, import only) and
RoBERTa-PreLayerNorm, for jaxlm models with absolute positions.

What is family-specific lives here: how each names jaxlm's leaves (`entries`: separate query,
key and value kernels, the norms after or before attention and the MLP, RoBERTa's position table
with `pad_token_id + 1` rows in front, the LM head's and NSP classifier's keys), the transformers
config of an export (`hf_config`), the `config.model` keys of an import (`model_overrides`) and
the refusal of the modern options, which this family does not compute (`check`). `convert.py`
chooses the family and calls these; the module docstring there says what exports to what.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from jaxlm.errors import UserError
from jaxlm.hf.mapping import (CLM, EXACT_GELU, NSP, Entry, Family, dense, lm_head_entries,
                              norm_entries, same)
from jaxlm.models.config import ModelConfig

_BERT_LM = {"transform/kernel": "cls.predictions.transform.dense.weight",
            "transform/bias": "cls.predictions.transform.dense.bias",
            "layer_norm/scale": "cls.predictions.transform.LayerNorm.weight",
            "layer_norm/bias": "cls.predictions.transform.LayerNorm.bias",
            "bias": "cls.predictions.bias",
            "output_embedding": "cls.predictions.decoder.weight"}  # Tied: never exported.
_ROBERTA_LM = {"transform/kernel": "lm_head.dense.weight", "transform/bias": "lm_head.dense.bias",
               "layer_norm/scale": "lm_head.layer_norm.weight",
               "layer_norm/bias": "lm_head.layer_norm.bias", "bias": "lm_head.bias",
               "output_embedding": "lm_head.decoder.weight"}  # Tied: never exported.

BERT = Family("bert", "bert.", False, False, _BERT_LM, "cls.seq_relationship",
              {"mlm+nsp": "BertForPreTraining", "mlm": "BertForMaskedLM",
               "clm": "BertLMHeadModel", "nsp": "BertForNextSentencePrediction",
               "": "BertModel"})
ROBERTA_PRE_LN = Family("roberta-prelayernorm", "roberta_prelayernorm.", True, True, _ROBERTA_LM,
                        None, {"mlm": "RobertaPreLayerNormForMaskedLM",
                               "clm": "RobertaPreLayerNormForCausalLM",
                               "": "RobertaPreLayerNormModel"})
ROBERTA = Family("roberta", "roberta.", False, True, _ROBERTA_LM, None,  # Import only.
                 {"mlm": "RobertaForMaskedLM", "clm": "RobertaForCausalLM", "": "RobertaModel"})


def entries(c: ModelConfig, family: Family, *, prefix: str, offset: int, lm_head: str | None,
            nsp: bool, pooler: bool) -> list[Entry]:
  """Every jaxlm leaf a BERT-family model holds, with its key: the base model's keys start with
  `prefix` (none in a bare base model), the position table has `offset` rows in front of
  jaxlm's, and `lm_head` / `nsp` / `pooler` say which parts it has."""
  emb, key = ("encoder", "embeddings"), f"{prefix}embeddings."

  def to_positions(table):
    return np.concatenate([np.zeros((offset, table.shape[1]), table.dtype), table])

  result = [
      Entry(emb + ("token", "embedding"), key + "word_embeddings.weight", same, same),
      Entry(emb + ("position", "embedding"), key + "position_embeddings.weight", to_positions,
            lambda t: t[offset:]),
      Entry(emb + ("token_type", "embedding"), key + "token_type_embeddings.weight", same, same),
      *norm_entries(emb + ("layer_norm",), key + "LayerNorm"),
  ]
  for i in range(c.num_layers):
    result += _layer_entries(c, family, i, prefix)
  if family.pre_layer_norm:
    result += norm_entries(("encoder", "final_norm"), f"{prefix}LayerNorm")
  if pooler:
    result += [dense(("encoder", "pooler", "kernel"), f"{prefix}pooler.dense.weight"),
               Entry(("encoder", "pooler", "bias"), f"{prefix}pooler.dense.bias", same, same)]
  if lm_head:
    result += lm_head_entries(c, family, lm_head)
  if nsp:
    result += [dense((NSP, "classifier", "kernel"), f"{family.nsp_head}.weight"),
               Entry((NSP, "classifier", "bias"), f"{family.nsp_head}.bias", same, same)]
  return result


def _layer_entries(c: ModelConfig, family: Family, i: int, prefix: str) -> list[Entry]:
  d, h, k = c.hidden_size, c.num_heads, c.head_dim
  ours, theirs = ("encoder", f"layer_{i}"), f"{prefix}encoder.layer.{i}."
  result = []
  for name in ("query", "key", "value"):  # [D, H, K] kernels, heads major as HF splits them.
    path, key = ours + ("attention", name), f"{theirs}attention.self.{name}."
    result += [
        Entry(path + ("kernel",), key + "weight", lambda x: x.reshape(d, h * k).T,
              lambda w: w.T.reshape(d, h, k)),
        Entry(path + ("bias",), key + "bias", lambda x: x.reshape(h * k),
              lambda w: w.reshape(h, k)),
    ]
  out = ours + ("attention", "out")
  result += [
      Entry(out + ("kernel",), f"{theirs}attention.output.dense.weight",
            lambda x: x.reshape(h * k, d).T, lambda w: w.T.reshape(h, k, d)),
      Entry(out + ("bias",), f"{theirs}attention.output.dense.bias", same, same),
      dense(ours + ("mlp", "wi", "kernel"), f"{theirs}intermediate.dense.weight"),
      Entry(ours + ("mlp", "wi", "bias"), f"{theirs}intermediate.dense.bias", same, same),
      dense(ours + ("mlp", "wo", "kernel"), f"{theirs}output.dense.weight"),
      Entry(ours + ("mlp", "wo", "bias"), f"{theirs}output.dense.bias", same, same),
  ]
  if family.pre_layer_norm:  # x + f(LN(x)): the norms sit before attention and the MLP.
    norms = {"attention_norm": "attention.LayerNorm", "mlp_norm": "intermediate.LayerNorm"}
  else:  # LN(x + f(x)): after them.
    norms = {"attention_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
  for norm, key in norms.items():
    result += norm_entries(ours + (norm,), f"{theirs}{key}")
  return result


# The end of a BERT refusal: where a modern run's export goes instead.
_TO_MODERNBERT = ("jaxlm exports the modern options and ModernBERT's layout to ModernBert, which "
                  "needs model.position_encoding='rope'")


def check(c: ModelConfig) -> None:
  """An absolute-position model exports to BERT or RoBERTa-PreLayerNorm: BERT's layer only."""
  # `(key, BERT's value)`: the modern options, which neither family computes otherwise.
  for key, bert_value in (("mlp_activation", "gelu"), ("use_bias", True), ("norm", "layer_norm"),
                          ("tie_output_embedding", True), ("mlm_head_transform", True)):
    if getattr(c, key) != bert_value:
      raise UserError(
          f"model.{key} is {getattr(c, key)!r}: Hugging Face's BERT and RoBERTa-PreLayerNorm "
          f"compute only model.{key}={bert_value!r}, so this run cannot be exported "
          f"({_TO_MODERNBERT}).")
  if not c.type_vocab_size:
    raise UserError(
        "model.type_vocab_size is 0: Hugging Face's BERT and RoBERTa-PreLayerNorm always add a "
        "token-type embedding, so this run cannot be exported. Export a run with "
        f"model.type_vocab_size=2 (BERT's); {_TO_MODERNBERT}.")
  if c.pre_layer_norm and not c.first_layer_attention_norm:
    raise UserError(
        "model.first_layer_attention_norm is False: RoBERTa-PreLayerNorm normalises before "
        "every layer's attention, so this run cannot be exported. Export a run with "
        f"model.first_layer_attention_norm=True; {_TO_MODERNBERT}.")


def hf_config(c: ModelConfig, family: Family, architecture: str):
  """The transformers config of an exported BERT or RoBERTa-PreLayerNorm."""
  import transformers

  cls = {BERT.model_type: transformers.BertConfig,
         ROBERTA_PRE_LN.model_type: transformers.RobertaPreLayerNormConfig}[family.model_type]
  positions = c.max_position + (PAD_ID + 1 if family.position_offset else 0)
  return cls(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, intermediate_size=c.mlp_dim,
      hidden_act="gelu",  # jaxlm's nn.gelu(approximate=False): the exact erf GELU.
      hidden_dropout_prob=c.dropout_rate, attention_probs_dropout_prob=c.attention_dropout_rate,
      max_position_embeddings=positions, type_vocab_size=c.type_vocab_size,
      initializer_range=c.initializer_range, layer_norm_eps=c.layer_norm_eps,
      pad_token_id=PAD_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID, tie_word_embeddings=True,
      is_decoder=architecture in (BERT.architectures[CLM], ROBERTA_PRE_LN.architectures[CLM]),
      architectures=[architecture], dtype="float32",
  )


def model_overrides(config: Mapping[str, Any], family: Family, where: str) -> dict[str, Any]:
  """`model_overrides` of a BERT, RoBERTa or RoBERTa-PreLayerNorm config: BERT's layer, with
  the exact GELU, a learned position table and a tied LM head."""
  act = config.get("hidden_act", "gelu")
  if act not in EXACT_GELU:
    raise UserError(f"hidden_act is '{act}'{where}; jaxlm computes the exact GELU only "
                    "(hidden_act='gelu'), so this model cannot be imported.")
  position_type = config.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise UserError(f"position_embedding_type is '{position_type}'{where}; jaxlm's "
                    "model.position_encoding=absolute reads a learned table only.")
  if not config.get("tie_word_embeddings", True):
    raise UserError(f"tie_word_embeddings is false{where}; jaxlm's LM heads always project with "
                    "the token embedding table.")
  positions = config.get("max_position_embeddings", 512)
  if family.position_offset:
    positions -= config.get("pad_token_id", PAD_ID) + 1
  hidden_dropout = config.get("hidden_dropout_prob", 0.1)
  return dict(
      vocab_size=config["vocab_size"],
      hidden_size=config["hidden_size"],
      num_layers=config["num_hidden_layers"],
      num_heads=config["num_attention_heads"],
      mlp_dim=config["intermediate_size"],
      max_position=positions,
      type_vocab_size=config.get("type_vocab_size", 2),
      dropout_rate=hidden_dropout,
      attention_dropout_rate=config.get("attention_probs_dropout_prob", hidden_dropout),
      pre_layer_norm=family.pre_layer_norm,
      layer_norm_eps=config.get("layer_norm_eps", 1e-12),
      initializer_range=config.get("initializer_range", 0.02),
      position_encoding="absolute",
      # BERT's layer, whatever the run's config held before (`init_from_hf` updates it).
      first_layer_attention_norm=True, mlp_activation="gelu", use_bias=True, norm="layer_norm",
      tie_output_embedding=True, mlm_head_transform=True,
  )
