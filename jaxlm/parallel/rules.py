"""One table from logical axis names to mesh axes, and the shardings derived from it.

Parameters, optimizer state, batches and activations all follow the same rules:
- `batch` is split over `data` and `fsdp` (both are data parallel for activations);
- `embed` (the hidden axis of every weight) is split over `fsdp`: ZeRO-3 style sharding of
  parameters and optimizer state, gathered by XLA layer by layer;
- `heads`, `mlp`, `vocab` (and the output side of hidden x hidden projections) are split over
  `tensor`: Megatron-style tensor parallelism.
`mesh.rules` in the config replaces entries of this table.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm.errors import UserError
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
  """The default table with `mesh.rules` (pairs of logical name, mesh axes) replacing entries."""
  overrides = {name: _as_mesh_axes(target) for name, target in mesh_config.rules}
  return tuple((name, overrides.pop(name, target)) for name, target in DEFAULT_RULES) + tuple(
      overrides.items()
  )


def _as_mesh_axes(target) -> str | tuple[str, ...] | None:
  if target is None or isinstance(target, str):
    return target or None
  return tuple(target)


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
