"""The pieces every Hugging Face family's weight mapping is built from.

A `Family` says how one transformers model family names the same weights; an `Entry` pairs one
jaxlm leaf with the HF tensor it becomes (and the conversion both ways), a `Fused` puts several
leaves in one tensor. Leaves are addressed by path in a flat tree (`flatten` / `unflatten`, a
scanned layer stack as `layer_<i>`). `bert.py` and `modernbert.py` list a model's entries with
these; `convert.py` writes and reads them. A module of its own so that the families and
`convert.py` share it without importing each other.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxlm.models.config import ModelConfig

Path = tuple[str, ...]
Flat = dict[Path, np.ndarray]

# The heads jaxlm names by objective; a pretraining run has a subset of them.
MLM, NSP, CLM = "mlm", "nsp", "clm"
# HF's exact GELU names ("gelu" is erf-based); the tanh approximations are not jaxlm's.
EXACT_GELU = ("gelu", "gelu_python")


@dataclasses.dataclass(frozen=True)
class Family:
  """How one transformers model family names the same weights."""

  model_type: str
  prefix: str  # Of the base model's keys inside a model with heads.
  pre_layer_norm: bool
  position_offset: bool  # RoBERTa: position ids start at pad_token_id + 1.
  lm_head: dict[str, str]  # jaxlm head leaf -> HF key.
  nsp_head: str | None  # HF key prefix of the NSP classifier; None: the family has none.
  architectures: dict[str, str]  # The exported/imported head set -> architecture.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One jaxlm leaf and the HF tensor it becomes."""

  path: Path
  key: str
  to_hf: Callable[[np.ndarray], np.ndarray]
  from_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def paths(self) -> tuple[Path, ...]:
    return (self.path,)

  def write(self, flat: Flat) -> np.ndarray:
    return self.to_hf(flat[self.path])

  def read(self, tensor: np.ndarray) -> Flat:
    return {self.path: self.from_hf(tensor)}


@dataclasses.dataclass(frozen=True)
class Fused:
  """Several jaxlm leaves of equal shape in one HF tensor, stacked along its first axis (a torch
  Linear's output rows): ModernBert's `Wqkv` and `Wi`. `to_hf` / `from_hf` convert one part."""

  paths: tuple[Path, ...]
  key: str
  to_hf: Callable[[np.ndarray], np.ndarray]
  from_hf: Callable[[np.ndarray], np.ndarray]

  def write(self, flat: Flat) -> np.ndarray:
    return np.concatenate([self.to_hf(flat[path]) for path in self.paths], axis=0)

  def read(self, tensor: np.ndarray) -> Flat:
    parts = np.split(tensor, len(self.paths), axis=0)
    return {path: self.from_hf(part) for path, part in zip(self.paths, parts)}


Mapped = Entry | Fused


def same(x):
  return x


def dense(path, key):
  """A Dense kernel `[in, out]` is a torch Linear weight `[out, in]`."""
  return Entry(path, key, lambda k: k.T, lambda w: w.T)


def norm_entries(path: Path, key: str, bias: bool = True) -> list[Entry]:
  entries = [Entry(path + ("scale",), key + ".weight", same, same)]
  if bias:  # `model.use_bias=False`: a LayerNorm with a scale only.
    entries.append(Entry(path + ("bias",), key + ".bias", same, same))
  return entries


def lm_head_entries(c: ModelConfig, family: Family, head: str) -> list[Entry]:
  """The LM head's leaves that this model has: a tied head has no `output_embedding`,
  `use_bias=False` no bias. (A BERT or RoBERTa head is always BERT's: tied, with its biases and
  transform; check_exportable refuses the others.)"""
  entries = []
  for leaf, key in family.lm_head.items():
    if ((leaf == "output_embedding" and c.tie_output_embedding)
        or (leaf.endswith("bias") and not c.use_bias)
        or (leaf.startswith(("transform/", "layer_norm/")) and not c.mlm_head_transform)):
      continue
    path = (head, *leaf.split("/"))
    entries.append(dense(path, key) if leaf.endswith("kernel") else
                   Entry(path, key, same, same))
  return entries


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
