"""jaxlm parameter trees <-> Hugging Face transformers (PyTorch) checkpoints.

Export (`save_hf`): the architecture follows the model, so that transformers computes jaxlm's
function with no missing or unexpected weight:

- post-LN (`model.pre_layer_norm=False`, BERT): MLM and NSP heads -> `BertForPreTraining`; MLM
  only -> `BertForMaskedLM`; CLM and no MLM -> `BertLMHeadModel` (`is_decoder`: causal attention,
  as jaxlm's causal view); NSP only -> `BertForNextSentencePrediction`; else `BertModel`.
- pre-LN: MLM -> `RobertaPreLayerNormForMaskedLM` (embedding LayerNorm, pre-LN layers, the final
  LayerNorm before the heads, as jaxlm); CLM and no MLM -> `RobertaPreLayerNormForCausalLM`; else
  `RobertaPreLayerNormModel`. RoBERTa numbers positions from `pad_token_id + 1` (pad 0 here),
  so its position table is jaxlm's with one zero row (padding's) in front: every non-padding
  token reads the row jaxlm reads.

What the architecture has no place for (the pooler of a masked or causal LM, a pre-LN model's NSP
head, a CLM or PLM head beside the exported one, PLM's `query_start`) goes, unchanged, into
`jaxlm_extra.safetensors` beside the model: transformers never reads it, `import_hf` puts it
back, so jaxlm -> HF -> jaxlm gives identical arrays.

Refused (`UserError` naming the option): `model.position_encoding=relative` (Transformer-XL
attention, which no BERT/RoBERTa computes) and `model.hidden_size` not a multiple of
`model.num_heads`. Every other jaxlm option maps: GELU is the exact (erf) one in both
(`hidden_act="gelu"`), `layer_norm_eps`, sizes and dropout rates are carried over; weights are
written in float32 whatever `model.param_dtype`.

Import (`import_hf`) reads BERT (post-LN), RoBERTa (post-LN, offset positions) and
RoBERTa-PreLayerNorm folders (safetensors, sharded or not, or `pytorch_model.bin`) into jaxlm's
layout, and refuses what jaxlm does not compute (a tanh GELU, relative positions, untied output
embeddings).
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from jaxlm.errors import UserError
from jaxlm.models.config import ModelConfig

EXTRA_FILE = "jaxlm_extra.safetensors"
Path = tuple[str, ...]
Flat = dict[Path, np.ndarray]

# The heads jaxlm names by objective; a pretraining run has a subset of them.
MLM, NSP, CLM = "mlm", "nsp", "clm"
# HF's exact GELU names ("gelu" is erf-based); the tanh approximations are not jaxlm's.
_EXACT_GELU = ("gelu", "gelu_python")


@dataclasses.dataclass(frozen=True)
class _Family:
  """How one transformers model family names the same weights."""

  model_type: str
  prefix: str  # Of the base model's keys inside a model with heads.
  pre_layer_norm: bool
  position_offset: bool  # RoBERTa: position ids start at pad_token_id + 1.
  lm_head: dict[str, str]  # jaxlm head leaf -> HF key.
  nsp_head: str | None  # HF key prefix of the NSP classifier; None: the family has none.
  architectures: dict[str, str]  # The exported/imported head set -> architecture.


_BERT_LM = {"transform/kernel": "cls.predictions.transform.dense.weight",
            "transform/bias": "cls.predictions.transform.dense.bias",
            "layer_norm/scale": "cls.predictions.transform.LayerNorm.weight",
            "layer_norm/bias": "cls.predictions.transform.LayerNorm.bias",
            "bias": "cls.predictions.bias"}
_ROBERTA_LM = {"transform/kernel": "lm_head.dense.weight", "transform/bias": "lm_head.dense.bias",
               "layer_norm/scale": "lm_head.layer_norm.weight",
               "layer_norm/bias": "lm_head.layer_norm.bias", "bias": "lm_head.bias"}

BERT = _Family("bert", "bert.", False, False, _BERT_LM, "cls.seq_relationship",
               {"mlm+nsp": "BertForPreTraining", "mlm": "BertForMaskedLM",
                "clm": "BertLMHeadModel", "nsp": "BertForNextSentencePrediction",
                "": "BertModel"})
ROBERTA_PRE_LN = _Family("roberta-prelayernorm", "roberta_prelayernorm.", True, True, _ROBERTA_LM,
                         None, {"mlm": "RobertaPreLayerNormForMaskedLM",
                                "clm": "RobertaPreLayerNormForCausalLM",
                                "": "RobertaPreLayerNormModel"})
ROBERTA = _Family("roberta", "roberta.", False, True, _ROBERTA_LM, None,  # Import only.
                  {"mlm": "RobertaForMaskedLM", "clm": "RobertaForCausalLM", "": "RobertaModel"})
_FAMILIES = {f.model_type: f for f in (BERT, ROBERTA_PRE_LN, ROBERTA)}
# Architectures whose base model has no pooler (transformers builds it add_pooling_layer=False).
_NO_POOLER = ("ForMaskedLM", "LMHeadModel", "ForCausalLM")


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One jaxlm leaf and the HF tensor it becomes."""

  path: Path
  key: str
  to_hf: Callable[[np.ndarray], np.ndarray]
  from_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _dense(path, key):
  """A Dense kernel `[in, out]` is a torch Linear weight `[out, in]`."""
  return _Entry(path, key, lambda k: k.T, lambda w: w.T)


def _layer_entries(c: ModelConfig, family: _Family, i: int, prefix: str) -> list[_Entry]:
  d, h, k = c.hidden_size, c.num_heads, c.head_dim
  ours, theirs = ("encoder", f"layer_{i}"), f"{prefix}encoder.layer.{i}."
  entries = []
  for name in ("query", "key", "value"):  # [D, H, K] kernels, heads major as HF splits them.
    path, key = ours + ("attention", name), f"{theirs}attention.self.{name}."
    entries += [
        _Entry(path + ("kernel",), key + "weight", lambda x: x.reshape(d, h * k).T,
               lambda w: w.T.reshape(d, h, k)),
        _Entry(path + ("bias",), key + "bias", lambda x: x.reshape(h * k),
               lambda w: w.reshape(h, k)),
    ]
  out = ours + ("attention", "out")
  entries += [
      _Entry(out + ("kernel",), f"{theirs}attention.output.dense.weight",
             lambda x: x.reshape(h * k, d).T, lambda w: w.T.reshape(h, k, d)),
      _Entry(out + ("bias",), f"{theirs}attention.output.dense.bias", _same, _same),
      _dense(ours + ("mlp", "wi", "kernel"), f"{theirs}intermediate.dense.weight"),
      _Entry(ours + ("mlp", "wi", "bias"), f"{theirs}intermediate.dense.bias", _same, _same),
      _dense(ours + ("mlp", "wo", "kernel"), f"{theirs}output.dense.weight"),
      _Entry(ours + ("mlp", "wo", "bias"), f"{theirs}output.dense.bias", _same, _same),
  ]
  if family.pre_layer_norm:  # x + f(LN(x)): the norms sit before attention and the MLP.
    norms = {"attention_norm": "attention.LayerNorm", "mlp_norm": "intermediate.LayerNorm"}
  else:  # LN(x + f(x)): after them.
    norms = {"attention_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
  for norm, key in norms.items():
    entries += _norm(ours + (norm,), f"{theirs}{key}")
  return entries


def _norm(path: Path, key: str) -> list[_Entry]:
  return [_Entry(path + ("scale",), key + ".weight", _same, _same),
          _Entry(path + ("bias",), key + ".bias", _same, _same)]


def _entries(c: ModelConfig, family: _Family, *, prefix: str, offset: int, lm_head: str | None,
             nsp: bool, pooler: bool) -> list[_Entry]:
  """Every jaxlm leaf an HF model holds, with its key: the base model's keys start with `prefix`
  (none in a bare base model), the position table has `offset` rows in front of jaxlm's, and
  `lm_head` / `nsp` / `pooler` say which parts it has."""
  emb, key = ("encoder", "embeddings"), f"{prefix}embeddings."

  def to_positions(table):
    return np.concatenate([np.zeros((offset, table.shape[1]), table.dtype), table])

  entries = [
      _Entry(emb + ("token", "embedding"), key + "word_embeddings.weight", _same, _same),
      _Entry(emb + ("position", "embedding"), key + "position_embeddings.weight", to_positions,
             lambda t: t[offset:]),
      _Entry(emb + ("token_type", "embedding"), key + "token_type_embeddings.weight", _same,
             _same),
      *_norm(emb + ("layer_norm",), key + "LayerNorm"),
  ]
  for i in range(c.num_layers):
    entries += _layer_entries(c, family, i, prefix)
  if family.pre_layer_norm:
    entries += _norm(("encoder", "final_norm"), f"{prefix}LayerNorm")
  if pooler:
    entries += [_dense(("encoder", "pooler", "kernel"), f"{prefix}pooler.dense.weight"),
                _Entry(("encoder", "pooler", "bias"), f"{prefix}pooler.dense.bias", _same, _same)]
  if lm_head:
    for leaf, hf_key in family.lm_head.items():
      path = (lm_head, *leaf.split("/"))
      entries.append(_dense(path, hf_key) if leaf.endswith("kernel") else
                     _Entry(path, hf_key, _same, _same))
  if nsp:
    entries += [_dense((NSP, "classifier", "kernel"), f"{family.nsp_head}.weight"),
                _Entry((NSP, "classifier", "bias"), f"{family.nsp_head}.bias", _same, _same)]
  return entries


def check_exportable(c: ModelConfig) -> None:
  """Raises UserError, naming the option, for a model no BERT / RoBERTa-PreLayerNorm computes:
  relative or rotary positions, the modern options of issue 13, heads that do not divide."""
  if c.position_encoding == "rope":
    raise UserError(
        "model.position_encoding is 'rope': rotary embeddings have no counterpart in Hugging "
        "Face's BERT or RoBERTa-PreLayerNorm, and jaxlm cannot export to ModernBert yet, so this "
        "run cannot be exported. Export a run trained with model.position_encoding=absolute.")
  if c.position_encoding != "absolute":
    raise UserError(
        f"model.position_encoding is '{c.position_encoding}': Transformer-XL relative attention "
        "has no counterpart in Hugging Face's BERT or RoBERTa-PreLayerNorm, so this run cannot "
        "be exported. Export a run trained with model.position_encoding=absolute.")
  # The modern options (issue 13), as `(key, BERT's value)`: none has a counterpart in BERT or
  # RoBERTa-PreLayerNorm (Hugging Face's ModernBert export is not written yet).
  for key, bert_value in (("mlp_activation", "gelu"), ("use_bias", True), ("norm", "layer_norm"),
                          ("tie_output_embedding", True), ("mlm_head_transform", True)):
    if getattr(c, key) != bert_value:
      raise UserError(
          f"model.{key} is {getattr(c, key)!r}: Hugging Face's BERT and RoBERTa-PreLayerNorm "
          f"compute only model.{key}={bert_value!r}, and jaxlm cannot export to ModernBert yet, "
          "so this run cannot be exported.")
  if c.hidden_size % c.num_heads:
    raise UserError(
        f"model.hidden_size ({c.hidden_size}) is not a multiple of model.num_heads "
        f"({c.num_heads}); Hugging Face attention needs heads x head size = hidden size. Export "
        "a run whose model.num_heads divides model.hidden_size.")


def choose_architecture(c: ModelConfig, heads: set[str]) -> tuple[_Family, str, str | None, bool]:
  """`(family, architecture, exported LM head name or None, NSP exported)` for a model with these
  head names (see the module docstring)."""
  check_exportable(c)
  family = ROBERTA_PRE_LN if c.pre_layer_norm else BERT
  lm_head = MLM if MLM in heads else (CLM if CLM in heads else None)
  nsp = NSP in heads and family.nsp_head is not None and lm_head != CLM
  name = "+".join([lm_head] * bool(lm_head) + [NSP] * nsp)
  return family, family.architectures[name], lm_head, nsp


def flatten(params: Mapping[str, Any]) -> Flat:
  """A jaxlm param tree as `{path: float32 numpy}`, a scanned layer stack as `layer_<i>`."""
  flat = {}

  def walk(node, path):
    if isinstance(node, Mapping):
      for name, child in node.items():
        walk(child, path + (str(name),))
      return
    array = np.asarray(node, np.float32)
    if path[:3] == ("encoder", "layers", "layer"):
      for i in range(array.shape[0]):
        flat[("encoder", f"layer_{i}") + path[3:]] = array[i]
    else:
      flat[path] = array

  walk(params, ())
  return flat


def unflatten(flat: Flat, scan_layers: bool = False) -> dict[str, Any]:
  """The inverse of `flatten`; `scan_layers` stacks `layer_<i>` into `encoder/layers/layer`."""
  tree: dict[str, Any] = {}
  stacked: dict[Path, dict[int, np.ndarray]] = {}
  for path, array in flat.items():
    if scan_layers and path[0] == "encoder" and re.fullmatch(r"layer_\d+", path[1]):
      stacked.setdefault(path[2:], {})[int(path[1][len("layer_"):])] = array
      continue
    _put(tree, path, array)
  for rest, layers in stacked.items():
    _put(tree, ("encoder", "layers", "layer") + rest,
         np.stack([layers[i] for i in range(len(layers))]))
  return tree


def _put(tree: dict, path: Path, value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def hf_config(c: ModelConfig, family: _Family, architecture: str):
  """The transformers config of the exported model."""
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


@dataclasses.dataclass(frozen=True)
class Exported:
  """What `to_hf` made of a param tree."""

  architecture: str
  config: Any  # A transformers PretrainedConfig.
  state: dict[str, np.ndarray]  # HF key -> array, tied copies (the decoder) left out.
  extra: dict[str, np.ndarray]  # "a/b/c" jaxlm path -> array, for EXTRA_FILE.
  lm_head: str | None  # The jaxlm head exported as the LM head, if any.


def to_hf(params: Mapping[str, Any], c: ModelConfig) -> Exported:
  """Converts a jaxlm param tree (`Pretrainer`'s `params`, boxes removed) to HF tensors."""
  check_exportable(c)
  if set(params) == {"params"}:  # A variables dict rather than its params collection.
    params = params["params"]
  flat = flatten(params)
  heads = {path[0] for path in flat} - {"encoder"}
  family, architecture, lm_head, nsp = choose_architecture(c, heads)
  bare = architecture == family.architectures[""]
  entries = _entries(c, family, prefix="" if bare else family.prefix,
                     offset=PAD_ID + 1 if family.position_offset else 0, lm_head=lm_head,
                     nsp=nsp, pooler=not architecture.endswith(_NO_POOLER))
  missing = [e.path for e in entries if e.path not in flat]
  if missing:
    raise ValueError(f"The param tree lacks {['/'.join(p) for p in missing[:5]]}: not a jaxlm "
                     "Pretrainer's params?")
  state = {e.key: np.ascontiguousarray(e.to_hf(flat[e.path])) for e in entries}
  used = {e.path for e in entries}
  extra = {"/".join(p): a for p, a in flat.items() if p not in used}
  return Exported(architecture, hf_config(c, family, architecture), state, extra, lm_head)


def save_hf(directory: str, params: Mapping[str, Any], c: ModelConfig) -> Exported:
  """Writes `config.json`, `model.safetensors` (and EXTRA_FILE when needed) into `directory`.

  The weights go through the transformers model itself (loaded strictly, then
  `save_pretrained`), so a key the architecture does not expect fails here, not in a user's
  `from_pretrained`.
  """
  import torch
  import transformers

  exported = to_hf(params, c)
  model_class = getattr(transformers, exported.architecture)
  model = model_class(exported.config)
  state = {k: torch.from_numpy(np.array(v)) for k, v in exported.state.items()}
  for key, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
    state.setdefault(key, state[source])  # The decoder is the token table (and the bias).
  model.load_state_dict(state, strict=True)
  model.eval()
  model.save_pretrained(directory)
  if exported.extra:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in exported.extra.items()},
              os.path.join(directory, EXTRA_FILE), metadata={"format": "jaxlm"})
  return exported


# Import.


def _read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"{directory} has no config.json: give a folder written by "
                    "`python -m jaxlm.export` or a transformers `save_pretrained`.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  """A safetensors file as float32 numpy (bfloat16 ones through torch, which numpy lacks)."""
  from safetensors.numpy import load_file

  try:
    return {k: v.astype(np.float32) if v.dtype.kind == "f" else v
            for k, v in load_file(path).items()}
  except TypeError:
    from safetensors.torch import load_file as load_torch

    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in load_torch(path).items()}


def read_state(directory: str) -> dict[str, np.ndarray]:
  """The weights of an HF folder: model.safetensors, a sharded index, or pytorch_model.bin."""
  single = os.path.join(directory, "model.safetensors")
  index = single + ".index.json"
  if os.path.isfile(single):
    return _read_tensors(single)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
      state.update(_read_tensors(os.path.join(directory, name)))
    return state
  legacy = os.path.join(directory, "pytorch_model.bin")
  if os.path.isfile(legacy):
    import torch

    loaded = torch.load(legacy, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in loaded.items()}
  raise UserError(f"{directory} holds no model.safetensors, model.safetensors.index.json or "
                  "pytorch_model.bin.")


def model_overrides(config: Mapping[str, Any], directory: str = "") -> dict[str, Any]:
  """The `config.model` keys of an HF config (the keys jaxlm can take; dtypes, remat and
  scanning stay the run's own). Raises UserError for what jaxlm does not compute."""
  where = f" ({directory})" if directory else ""
  model_type = config.get("model_type")
  family = _FAMILIES.get(model_type)
  if family is None:
    raise UserError(f"Hugging Face model type '{model_type}'{where} is not one jaxlm imports: "
                    f"use a {', '.join(sorted(_FAMILIES))} checkpoint.")
  act = config.get("hidden_act", "gelu")
  if act not in _EXACT_GELU:
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
  )


def from_hf(config: Mapping[str, Any], state: Mapping[str, np.ndarray],
            extra: Mapping[str, np.ndarray] | None = None, *, scan_layers: bool = False,
            directory: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
  """`(model overrides, params)` from an HF config dict and state dict (see `import_hf`)."""
  overrides = model_overrides(config, directory)
  family = _FAMILIES[config["model_type"]]
  c = ModelConfig(**overrides)
  check_exportable(c)
  state = {_modern_name(k): v for k, v in state.items()}
  base_prefix = family.prefix if any(k.startswith(family.prefix) for k in state) else ""
  architecture = (config.get("architectures") or [""])[0]
  lm_key = family.lm_head["transform/kernel"]
  lm_head = None
  if lm_key in state:
    lm_head = CLM if config.get("is_decoder") or architecture.endswith(("LMHeadModel",
                                                                        "ForCausalLM")) else MLM
  nsp = family.nsp_head is not None and f"{family.nsp_head}.weight" in state
  offset = config.get("pad_token_id", PAD_ID) + 1 if family.position_offset else 0
  entries = _entries(c, family, prefix=base_prefix, offset=offset, lm_head=lm_head, nsp=nsp,
                     pooler=f"{base_prefix}pooler.dense.weight" in state)
  missing = [e.key for e in entries if e.key not in state]
  if missing:
    raise UserError(f"The checkpoint{' in ' + directory if directory else ''} lacks "
                    f"{missing[:3]}{' ...' if len(missing) > 3 else ''}: not a complete "
                    f"{family.model_type} model.")
  flat = {e.path: np.asarray(e.from_hf(state[e.key]), np.float32) for e in entries}
  decoder = "cls.predictions.decoder.weight" if family is BERT else "lm_head.decoder.weight"
  if lm_head and decoder in state and not np.array_equal(
      state[decoder], state[f"{base_prefix}embeddings.word_embeddings.weight"]):
    raise UserError(f"The output projection{' in ' + directory if directory else ''} is not the "
                    "token embedding table; jaxlm's LM heads are tied to it.")
  for name, array in (extra or {}).items():
    flat.setdefault(tuple(name.split("/")), np.asarray(array, np.float32))
  return overrides, unflatten(flat, scan_layers)


def _modern_name(key: str) -> str:
  """Old TF-converted checkpoints call LayerNorm parameters gamma and beta."""
  if key.endswith(".gamma"):
    return key[: -len("gamma")] + "weight"
  if key.endswith(".beta"):
    return key[: -len("beta")] + "bias"
  return key


def import_hf(directory: str, *,
              scan_layers: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
  """Reads a Hugging Face folder into jaxlm: `(model_overrides, params)`.

  `model_overrides`: `config.model` keys (sizes, `pre_layer_norm`, `layer_norm_eps`, dropout
  rates, `initializer_range`, `position_encoding`) to apply to the run's config.
  `params`: nested dicts of float32 numpy arrays in `Pretrainer`'s layout: `encoder/...` (layers
  as `layer_<i>`, or stacked under `layers/layer` with `scan_layers=True`) and one subtree per
  head the folder holds (`mlm`, or `clm` for a causal LM; `nsp`), plus whatever a jaxlm export
  left in EXTRA_FILE. What the folder lacks (a `BertForMaskedLM` has no pooler and no NSP head)
  is absent: `overlay` puts the imported arrays onto a freshly initialised tree.
  """
  config = _read_config(directory)
  extra_path = os.path.join(directory, EXTRA_FILE)
  extra = _read_tensors(extra_path) if os.path.isfile(extra_path) else None
  return from_hf(config, read_state(directory), extra, scan_layers=scan_layers,
                 directory=directory)


# Encoder parameters an HF folder may lack: a masked LM's pooler; PLM's query-stream start.
_OPTIONAL = ("encoder/pooler/", "encoder/query_start")


@dataclasses.dataclass(frozen=True)
class Overlaid:
  params: dict[str, Any]  # numpy arrays, in the dtypes of the initial tree.
  kept: list[str]  # Paths that kept their initial value (the folder lacks them).
  dropped: list[str]  # Imported paths the model lacks (a head of an objective not trained).


def overlay(initial: Mapping[str, Any], imported: Mapping[str, Any]) -> Overlaid:
  """`initial` (a fresh init of the run's model) with every array of `imported` in its place.

  A leaf of another shape is a UserError (config.model does not fit the checkpoint), and so is an
  encoder the import left uninitialised beyond the pooler and PLM's start vector (layers read
  with another `scan_layers`, a wrong layer count). Imported heads the model lacks are dropped.
  """
  merged: dict[str, Any] = {}
  kept: list[str] = []
  dropped: list[str] = []

  def walk(init_node, imp_node, out, path):
    for name, child in init_node.items():
      here = path + (name,)
      theirs = imp_node.get(name)
      if isinstance(child, Mapping):
        walk(child, theirs if isinstance(theirs, Mapping) else {}, out.setdefault(name, {}), here)
      elif theirs is None or isinstance(theirs, Mapping):
        out[name] = child
        kept.append("/".join(here))
      else:
        if tuple(np.shape(theirs)) != tuple(np.shape(child)):
          raise UserError(f"Imported {'/'.join(here)} has shape {tuple(np.shape(theirs))}, the "
                          f"model's is {tuple(np.shape(child))}: set config.model to the "
                          "checkpoint's sizes.")
        out[name] = np.asarray(theirs).astype(getattr(child, "dtype", np.float32))
    dropped.extend("/".join(path + (name,)) for name in imp_node if name not in init_node)

  walk(initial, imported, merged, ())
  missing = [p for p in kept if p.startswith("encoder/") and not p.startswith(_OPTIONAL)]
  if missing:
    raise UserError(f"The imported checkpoint has no {missing[0]} ({len(missing)} encoder "
                    "parameters missing): config.model (num_layers, scan_layers with "
                    "import_hf(scan_layers=...)) does not fit it.")
  return Overlaid(merged, sorted(kept), sorted(dropped))
