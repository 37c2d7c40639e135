"""jaxlm parameter trees <-> Hugging Face transformers (PyTorch) checkpoints.

This module holds the public entry points (`check_exportable`, `to_hf` / `save_hf`,
`model_overrides`, `from_hf` / `import_hf`, `overlay`) and what every family shares: choosing the
family and architecture, the extra-weights file, reading folders. Each family's own names,
configs and refusals live beside it, so that one family can change without reading the others:
`bert.py` (BERT, RoBERTa, RoBERTa-PreLayerNorm) and `modernbert.py` (ModernBert), both built
from `mapping.py` (leaf <-> tensor entries, flat parameter trees).

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
- rotary positions (`model.position_encoding=rope`): MLM -> `ModernBertForMaskedLM`, else
  `ModernBertModel`. ModernBERT's layout is pre-LN with LayerNorms, a gated MLP, no token types
  and no norm before layer 0's attention, so the run needs `pre_layer_norm=True`,
  `first_layer_attention_norm=False`, `type_vocab_size=0`, `norm=layer_norm`,
  `mlm_head_transform=True` and `mlp_activation` geglu (`hidden_activation="gelu"`) or swiglu
  (`"silu"`). `use_bias` sets every `*_bias` flag, `tie_output_embedding` sets
  `tie_word_embeddings`, and every layer is global attention (`layer_types`) with
  `rope_theta` as its theta. Query, key and value kernels are fused into `Wqkv`, `wi_gate` and
  `wi_up` into `Wi` (`modernbert.py` gives the row order). Dropout rates are carried over
  (embedding, MLP and attention), applied where ModernBert applies them: only training differs.

What the architecture has no place for (the pooler of a masked or causal LM, a pre-LN or
ModernBert model's NSP head, a CLM or PLM head beside the exported one, PLM's `query_start`) goes,
unchanged, into `jaxlm_extra.safetensors` beside the model: transformers never reads it,
`import_hf` puts it back, so jaxlm -> HF -> jaxlm gives identical arrays.

Refused (`UserError` naming the option and the value that would export): relative positions
(Transformer-XL attention, which no BERT, RoBERTa or ModernBert computes), the modern options
with absolute positions (BERT and RoBERTa-PreLayerNorm compute BERT's layer only, with a
token-type table), a rotary model whose layout ModernBert does not compute (above), and
`model.hidden_size` not a multiple of `model.num_heads`. GELU is the exact (erf) one everywhere
(`"gelu"`), the norm epsilon, sizes and dropout rates are carried over; weights are written in
float32 whatever `model.param_dtype`.

Import (`import_hf`) reads BERT (post-LN), RoBERTa (post-LN, offset positions),
RoBERTa-PreLayerNorm and ModernBert folders (safetensors, sharded or not, or `pytorch_model.bin`)
into jaxlm's layout, and refuses what jaxlm does not compute (a tanh GELU, relative positions,
untied output embeddings outside ModernBert, ModernBERT's sliding-window layers, biases on in
some layers and off in others).
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxlm.data.tokenizer import PAD_ID
from jaxlm.errors import UserError
from jaxlm.hf import bert, modernbert
from jaxlm.hf.bert import BERT, ROBERTA, ROBERTA_PRE_LN
from jaxlm.hf.mapping import CLM, MLM, NSP, Family, Mapped, flatten, unflatten
from jaxlm.hf.modernbert import MODERNBERT
from jaxlm.models.config import ModelConfig

EXTRA_FILE = "jaxlm_extra.safetensors"

_FAMILIES = {f.model_type: f for f in (BERT, ROBERTA_PRE_LN, ROBERTA, MODERNBERT)}
# Architectures whose base model has no pooler (transformers builds it add_pooling_layer=False).
_NO_POOLER = ("ForMaskedLM", "LMHeadModel", "ForCausalLM")


def _entries(c: ModelConfig, family: Family, *, prefix: str, offset: int, lm_head: str | None,
             nsp: bool, pooler: bool) -> list[Mapped]:
  """Every jaxlm leaf an HF model holds, with its key: the base model's keys start with `prefix`
  (none in a bare base model), the position table has `offset` rows in front of jaxlm's, and
  `lm_head` / `nsp` / `pooler` say which parts it has (a ModernBert has no position table, NSP
  head or pooler)."""
  if family is MODERNBERT:
    return modernbert.entries(c, prefix, lm_head)
  return bert.entries(c, family, prefix=prefix, offset=offset, lm_head=lm_head, nsp=nsp,
                      pooler=pooler)


def check_exportable(c: ModelConfig) -> None:
  """Raises UserError, naming the option and the value that would export, for a model no
  architecture of the module docstring computes: relative positions; with absolute positions,
  the modern options (BERT / RoBERTa-PreLayerNorm); with rotary ones, a layout other than
  ModernBERT's; heads that do not divide the hidden size."""
  if c.hidden_size % c.num_heads:
    raise UserError(
        f"model.hidden_size ({c.hidden_size}) is not a multiple of model.num_heads "
        f"({c.num_heads}); Hugging Face attention needs heads x head size = hidden size. Export "
        "a run whose model.num_heads divides model.hidden_size.")
  if c.position_encoding == "rope":
    modernbert.check(c)
  elif c.position_encoding == "absolute":
    bert.check(c)
  else:
    raise UserError(
        f"model.position_encoding is '{c.position_encoding}': Transformer-XL relative attention "
        "has no counterpart in Hugging Face's BERT, RoBERTa-PreLayerNorm or ModernBert, so this "
        "run cannot be exported. Export a run trained with model.position_encoding=absolute "
        "(BERT) or rope (ModernBert).")


def choose_architecture(c: ModelConfig, heads: set[str]) -> tuple[Family, str, str | None, bool]:
  """`(family, architecture, exported LM head name or None, NSP exported)` for a model with these
  head names (see the module docstring)."""
  check_exportable(c)
  if c.position_encoding == "rope":  # ModernBert has a masked LM only.
    family, lm_head = MODERNBERT, MLM if MLM in heads else None
  else:
    family = ROBERTA_PRE_LN if c.pre_layer_norm else BERT
    lm_head = MLM if MLM in heads else (CLM if CLM in heads else None)
  nsp = NSP in heads and family.nsp_head is not None and lm_head != CLM
  name = "+".join([lm_head] * bool(lm_head) + [NSP] * nsp)
  return family, family.architectures[name], lm_head, nsp


def hf_config(c: ModelConfig, family: Family, architecture: str):
  """The transformers config of the exported model."""
  if family is MODERNBERT:
    return modernbert.hf_config(c, architecture)
  return bert.hf_config(c, family, architecture)


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
  used = {path for e in entries for path in e.paths}
  missing = sorted(used - set(flat))
  if missing:
    raise ValueError(f"The param tree lacks {['/'.join(p) for p in missing[:5]]}: not a jaxlm "
                     "Pretrainer's params?")
  state = {e.key: np.ascontiguousarray(e.write(flat)) for e in entries}
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
  if family is MODERNBERT:
    return modernbert.model_overrides(config, where)
  return bert.model_overrides(config, family, where)


def from_hf(config: Mapping[str, Any], state: Mapping[str, np.ndarray],
            extra: Mapping[str, np.ndarray] | None = None, *, scan_layers: bool = False,
            directory: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
  """`(model overrides, params)` from an HF config dict and state dict (see `import_hf`)."""
  overrides = model_overrides(config, directory)
  family = _FAMILIES[config["model_type"]]
  # With the layout asked for: a ModernBert cannot be scanned (ModelConfig says why).
  c = ModelConfig(**overrides, scan_layers=scan_layers)
  check_exportable(c)
  state = {_modern_name(k): v for k, v in state.items()}
  base_prefix = family.prefix if any(k.startswith(family.prefix) for k in state) else ""
  architecture = (config.get("architectures") or [""])[0]
  lm_key = family.lm_head["transform/kernel"]
  lm_head = None
  if lm_key in state and (family is not MODERNBERT or architecture.endswith("ForMaskedLM")):
    # (ModernBert's classifiers have a `head` too.)
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
  flat = {path: np.asarray(array, np.float32)
          for e in entries for path, array in e.read(state[e.key]).items()}
  decoder = family.lm_head["output_embedding"]
  tokens = (f"{base_prefix}{modernbert.TOKEN_TABLE}" if family is MODERNBERT else
            f"{base_prefix}embeddings.word_embeddings.weight")
  if lm_head and c.tie_output_embedding and decoder in state and not np.array_equal(
      state[decoder], state[tokens]):
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
