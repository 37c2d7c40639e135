"""One table from logical axis names to mesh axes, and the shardings derived from it.

Parameters, optimizer state, batches and activations all follow the same rules:
- `batch` is split over `data` and `fsdp` (both are data parallel for activations);
- `embed` (the hidden axis of every weight) is split over `fsdp`: ZeRO-3 style sharding of
  parameters and optimizer state, gathered by XLA layer by layer;
- `heads`, `mlp`, `vocab` (and the output side of hidden x hidden projections) are split over
  `tensor`: Megatron-style tensor parallelism.
`mesh.rules` in the config replaces entries of this table (see `rules_from_config`).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.errors import UserError, closest
from jaxlm.parallel.mesh import AXES as MESH_AXES
from jaxlm.parallel import axes

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    (axes.BATCH, ("data", "fsdp")),
    (axes.EMBED, "fsdp"),
    (axes.EMBED_OUT, "tensor"),
    (axes.MLP, "tensor"),
    (axes.HEADS, "tensor"),
    (axes.VOCAB, "tensor"),
    (axes.KV, None),
    (axes.LENGTH, None),
    (axes.POSITION, None),
    (axes.TOKEN_TYPE, None),
    (axes.CLASSES, None),
    (axes.PREDICTIONS, None),
    (axes.LAYERS, None),
)


def rules_from_config(mesh_config: ml_collections.ConfigDict) -> Rules:
  """The default table with the entries named in `mesh.rules` replaced.

  `mesh.rules` is a string (so it can be overridden from the command line) of comma-separated
  `logical=mesh` entries, where `mesh` is `none` (replicated), one mesh axis, or several joined
  by `+`: e.g. `"embed=none,mlp=fsdp+tensor"`.
  """
  overrides = parse_rules(mesh_config.rules)
  return tuple((name, overrides.get(name, target)) for name, target in DEFAULT_RULES)


def parse_rules(text: str) -> dict[str, str | tuple[str, ...] | None]:
  known = [name for name, _ in DEFAULT_RULES]
  overrides = {}
  for entry in (e.strip() for e in text.split(",")):
    if not entry:
      continue
    name, sep, target = (part.strip() for part in entry.partition("="))
    if not sep or name not in known:
      raise UserError(
          f"mesh.rules entry '{entry}': expected logical=mesh_axes with a logical axis among "
          f"{known}.{closest(name, known)}"
      )
    axes_ = tuple(a.strip() for a in target.split("+") if a.strip() and a.strip() != "none")
    unknown = [a for a in axes_ if a not in MESH_AXES]
    if unknown:
      raise UserError(f"mesh.rules entry '{entry}': '{unknown[0]}' is not a mesh axis; use "
                      f"{MESH_AXES} or none.")
    overrides[name] = None if not axes_ else axes_[0] if len(axes_) == 1 else axes_
  return overrides


def logical_shardings(tree, mesh: jax.sharding.Mesh, rules: Rules):
  """NamedShardings for a tree that may hold `nn.Partitioned` boxes (unboxed leaves replicate)."""
  specs = nn.get_partition_spec(tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
  """Batches are split along their first axis by the `batch` rule."""
  spec = nn.logical_to_mesh_axes((axes.BATCH,), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_divisible(abstract_params, shardings, mesh: jax.sharding.Mesh) -> None:
  """Every sharded dimension must divide by its mesh axes; names the parameter if not."""
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_params)
  flat_shardings = jax.tree_util.tree_leaves(shardings)
  for (path, leaf), sharding in zip(flat, flat_shardings):
    for dim, mesh_axes in zip(leaf.shape, sharding.spec):
      if mesh_axes is None:
        continue
      names: Sequence[str] = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
      size = 1
      for n in names:
        size *= mesh.shape[n]
      if dim % size:
        raise UserError(
            f"Parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split "
            f"over mesh axes {names} ({size} devices): {dim} is not divisible by {size}. "
            "Change the model size or the mesh (mesh.data / mesh.fsdp / mesh.tensor)."
        )


def check_rules_applied(boxed_params, shardings, rules: Rules) -> None:
  """Every named dimension with a rule must be sharded as the rule says.

  Flax gives a mesh axis to at most one dimension of an array and silently leaves a later
  dimension that asks for the same axis unsharded (e.g. `mlp=fsdp` next to `embed=fsdp`).
  That is refused here, naming the parameter and the rules in conflict.
  """
  table = dict(rules)
  is_box = lambda x: isinstance(x, nn.Partitioned)
  boxes = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=is_box)[0]
  for (path, box), sharding in zip(boxes, jax.tree_util.tree_leaves(shardings)):
    if not is_box(box):
      continue
    for name, got in zip(box.names, tuple(sharding.spec) + (None,) * len(box.names)):
      want = table.get(name)
      if want is not None and got is None:
        raise UserError(
            f"Parameter {jax.tree_util.keystr(path)} has axes {box.names}: the rule "
            f"'{name}' -> {want} cannot apply because another of its axes already uses that "
            f"mesh axis (a mesh axis shards one dimension per array). Change mesh.rules, e.g. "
            f"'embed=none,{name}=...'."
        )
