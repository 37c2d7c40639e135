"""LoRA (Hu et al. 2021) as a pure transformation of parameter trees; no module changes.

A targeted kernel W of the encoder's layers gets two small matrices, A [in, r] and B [r, out],
where `in` and `out` are the products of W's input and output axes (a `[D, H, K]` query kernel
is a D x HK matrix; the attention output's `[H, K, D]`, an HK x D one). The model then runs with
`merge(params, adapters)`: W + (alpha / r) A B, reshaped to W's shape. A starts random and B at
zero, so the merged model starts exactly as the base one; training takes gradients with respect
to the adapters (and whatever else the caller trains, such as a new head) and leaves W as it was.

Adapters mirror the kernels' paths, `{"encoder": {"layer_0": {"attention": {"query": {"a": A,
"b": B}}}}}`; with `scan_layers` the kernels and so A and B carry a leading layer axis.
"""

import dataclasses
import functools
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.errors import UserError, closest

Params = dict[str, Any]
Path = tuple[str, ...]

# Projection module name -> (the block holding it, how many leading kernel axes are inputs),
# as jaxlm.models.attention and jaxlm.models.layers name them.
PROJECTIONS: dict[str, tuple[str, int]] = {
    "query": ("attention", 1),  # [D, H, K]
    "key": ("attention", 1),  # [D, H, K]
    "value": ("attention", 1),  # [D, H, K]
    "out": ("attention", 2),  # [H, K, D]
    "position": ("attention", 1),  # [D, H, K], relative attention only.
    "wi": ("mlp", 1),  # [D, F]
    "wi_gate": ("mlp", 1),  # [D, F], gated MLPs (model.mlp_activation geglu / swiglu) only.
    "wi_up": ("mlp", 1),  # [D, F], gated MLPs only.
    "wo": ("mlp", 1),  # [F, D]
}
# Shorthands a target list may use; a group needs only one member in the model (the MLP has
# `wi`, or `wi_gate` and `wi_up`).
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("query", "key", "value", "out"),
    "mlp": ("wi", "wi_gate", "wi_up", "wo"),
}
_LAYER = re.compile(r"layer_\d+|layers")  # Unrolled layers, or the scanned stack.


@dataclasses.dataclass(frozen=True)
class LoraOptions:
  """`targets` name projections (`PROJECTIONS`) or groups of them (`GROUPS`)."""

  rank: int
  alpha: float
  targets: tuple[str, ...]

  def __post_init__(self):
    if isinstance(self.rank, bool) or self.rank != int(self.rank) or self.rank <= 0:
      raise UserError(f"LoRA rank is {self.rank}; use a positive integer such as 8.")
    # Plain types whatever the config held (a list of targets, a numpy rank): hashable, static.
    object.__setattr__(self, "rank", int(self.rank))
    object.__setattr__(self, "alpha", float(self.alpha))
    object.__setattr__(self, "targets", tuple(self.targets))
    if not self.targets:
      raise UserError(f"LoRA has no targets; name some of {sorted(PROJECTIONS)} or "
                      f"{sorted(GROUPS)}.")
    known = list(PROJECTIONS) + list(GROUPS)
    for target in self.targets:
      if target not in known:
        raise UserError(f"Unknown LoRA target '{target}'.{closest(target, known)} Targets are "
                        f"the projections {sorted(PROJECTIONS)} or the groups {sorted(GROUPS)}.")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def projections(self) -> tuple[str, ...]:
    """The targets with groups expanded, each once, in `PROJECTIONS` order."""
    wanted = {p for t in self.targets for p in GROUPS.get(t, (t,))}
    return tuple(p for p in PROJECTIONS if p in wanted)


def _walk(tree, path: Path = ()) -> Iterator[tuple[Path, Any]]:
  """(path, leaf) of nested mappings, in sorted key order."""
  if isinstance(tree, Mapping):
    for key in sorted(tree):
      yield from _walk(tree[key], path + (key,))
  else:
    yield path, tree


def _get(tree, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def target_paths(params: Params, options: LoraOptions) -> list[Path]:
  """Paths of the targeted modules (the kernel is `<path>/kernel`), in sorted order.

  A UserError when a target matches nothing (e.g. `position` in a model with absolute
  positions): a silently empty adapter set would fine-tune only the head.
  """
  wanted = options.projections
  found: dict[str, list[Path]] = {p: [] for p in wanted}
  for path, _ in _walk(params):
    if len(path) < 4 or path[-1] != "kernel" or path[-2] not in wanted:
      continue
    block = PROJECTIONS[path[-2]][0]
    if path[-3] == block and any(_LAYER.fullmatch(key) for key in path[:-3]):
      found[path[-2]].append(path[:-1])
  missing = [p for p in wanted if not found[p] and p in options.targets]
  missing += [g for g in options.targets if g in GROUPS and not any(found.get(p) for p in
                                                                      GROUPS[g])]
  if missing:
    raise UserError(f"LoRA targets {missing} match no kernel of this model's layers "
                    "('position' exists with model.position_encoding='relative' only; 'wi_gate' "
                    "and 'wi_up' with a gated model.mlp_activation, 'wi' without). Remove them.")
  return sorted(path for paths in found.values() for path in paths)


def _shape(leaf) -> tuple[tuple[int, ...], Any]:
  leaf = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
  return tuple(leaf.shape), leaf.dtype


def _split(path: Path, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
  """A kernel's (leading layer axes, flattened input size, flattened output size)."""
  inputs = PROJECTIONS[path[-1]][1]
  stacked = 1 if "layers" in path else 0
  lead, rest = shape[:stacked], shape[stacked:]
  return lead, math.prod(rest[:inputs]), math.prod(rest[inputs:])


def init_adapters(rng: jax.Array, params: Params, options: LoraOptions) -> Params:
  """A ~ N(0, 1/in) and B = 0 for every targeted kernel, in the kernel's dtype.

  `params` may be arrays, `jax.ShapeDtypeStruct`s or `nn.Partitioned` boxes (only shapes are
  read). Traceable: it may run inside a jitted initialiser with `out_shardings`.
  """
  spec = []
  for path in target_paths(params, options):
    shape, dtype = _shape(_get(params, path + ("kernel",)))
    spec.append((path, _split(path, shape), jnp.dtype(dtype)))
  adapters: Params = {}
  for (path, *_), pair in zip(spec, _draw(rng, tuple(spec), options.rank)):
    node = adapters
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = pair
  return adapters


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(rng: jax.Array, spec: tuple, rank: int) -> list[dict[str, jax.Array]]:
  """Every adapter pair in one compiled call, every A cut from one normal draw (on CPU each
  separate draw adds about half a second of compilation)."""
  sizes = [math.prod(lead) * fan_in * rank for _, (lead, fan_in, _), _ in spec]
  noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  pairs, start = [], 0
  for size, (_, (lead, fan_in, fan_out), dtype) in zip(sizes, spec):
    a = noise[start:start + size].reshape(lead + (fan_in, rank)) / math.sqrt(fan_in)
    pairs.append({"a": a.astype(dtype), "b": jnp.zeros(lead + (rank, fan_out), dtype)})
    start += size
  return pairs


def delta(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """scale x A B in the kernel's shape and dtype (A [..., in, r], B [..., r, out])."""
  ab = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                  precision=jax.lax.Precision.HIGHEST)
  return (scale * ab).reshape(kernel.shape).astype(kernel.dtype)


def merge(params: Params, adapters: Params, options: LoraOptions) -> Params:
  """`params` with W + (alpha / rank) A B for every adapted kernel; the other leaves are the
  same objects. Pure and traceable: use it inside the jitted step, before `model.apply`."""
  merged = dict(params)
  for path, leaf in _walk(adapters):
    if path[-1] != "a":
      continue
    module = path[:-1]
    node, original = merged, params
    for name in module:  # Copy the dicts along the path, never mutating `params`.
      original = original[name]
      node[name] = dict(original) if node.get(name) is original else node[name]
      node = node[name]
    pair = _get(adapters, module)
    node["kernel"] = original["kernel"] + delta(original["kernel"], pair["a"], pair["b"],
                                                options.scale)
  return merged


def count(tree) -> int:
  """Number of elements in a tree of arrays (or shape structs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def adapter_fraction(params: Params, adapters: Params) -> float:
  """Adapter elements as a fraction of the base model's."""
  return count(adapters) / count(params)
