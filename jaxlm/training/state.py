"""The train state and its creation, born sharded over the mesh.

Shardings are derived, never written by hand: `jax.eval_shape` of the initialiser gives the
parameter tree with its logical axis names, the rules turn those into mesh shardings, and the
initialiser is then jitted with those `out_shardings`, so no parameter ever exists unsharded.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxlm.parallel import rules as rules_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken, also the data position.
  params: Any
  opt_state: Any


# (rng, the model's boxed parameters) -> the boxed parameters that train (LoRA: adapters + head).
Select = Callable[[jax.Array, Any], Any]


def _init_boxed(rng, *, model: nn.Module, tx: optax.GradientTransformation, batch,
                select: Select | None = None) -> TrainState:
  """`batch` gives shapes only (ShapeDtypeStructs); zeros of those shapes drive `model.init`."""
  batch = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), batch)
  init_rng, select_rng = jax.random.split(rng) if select else (rng, None)
  params = model.init({"params": init_rng}, batch, deterministic=True)["params"]
  if select:
    params = select(select_rng, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _init(rng, **kwargs) -> TrainState:
  return nn.meta.unbox(_init_boxed(rng, **kwargs))


def abstract_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    batch: Mapping[str, jax.ShapeDtypeStruct],
    mesh: jax.sharding.Mesh,
    rules: rules_lib.Rules,
    select: Select | None = None,
) -> tuple[TrainState, TrainState]:
  """Returns `(abstract_state, shardings)`: shapes, dtypes and shardings of every leaf."""
  boxed = jax.eval_shape(
      functools.partial(_init_boxed, model=model, tx=tx, batch=batch, select=select),
      jax.random.key(0)
  )
  shardings = rules_lib.logical_shardings(boxed, mesh, rules)
  # Strip the boxes without `unbox()`, which would apply sharding constraints outside jit.
  plain = jax.tree_util.tree_map(
      lambda x: x.value if isinstance(x, nn.Partitioned) else x,
      boxed,
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  rules_lib.check_divisible(plain.params, shardings.params, mesh)
  rules_lib.check_rules_applied(boxed.params, shardings.params, rules)
  abstract = jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      plain,
      shardings,
  )
  return abstract, shardings


def init_params_boxed(rng, *, model: nn.Module, batch):
  """The model's parameters (boxed with their logical axes) from one-row batch shapes."""
  batch = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), batch)
  return model.init({"params": rng}, batch, deterministic=True)["params"]


def init_params(rng, model: nn.Module, batch, abstract) -> Any:
  """The model's parameters, initialised directly in the shardings of `abstract`."""
  init = jax.jit(lambda r: nn.meta.unbox(init_params_boxed(r, model=model, batch=batch)),
                 out_shardings=jax.tree_util.tree_map(lambda a: a.sharding, abstract))
  return init(rng)


def abstract_params(
    model: nn.Module,
    batch: Mapping[str, jax.ShapeDtypeStruct],
    mesh: jax.sharding.Mesh,
    rules: rules_lib.Rules,
):
  """Shapes, dtypes and shardings of the parameters alone (to restore them without the
  optimizer state)."""
  boxed = jax.eval_shape(functools.partial(init_params_boxed, model=model, batch=batch),
                         jax.random.key(0))
  shardings = rules_lib.logical_shardings(boxed, mesh, rules)
  plain = jax.tree_util.tree_map(
      lambda x: x.value if isinstance(x, nn.Partitioned) else x, boxed,
      is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      plain, shardings)


def init_state(
    rng: jax.Array,
    model: nn.Module,
    tx: optax.GradientTransformation,
    batch: Mapping[str, jax.ShapeDtypeStruct],
    shardings: TrainState,
    select: Select | None = None,
) -> TrainState:
  """Initialises parameters and optimizer state directly in their shardings."""
  init = jax.jit(
      functools.partial(_init, model=model, tx=tx, batch=batch, select=select),
      out_shardings=shardings
  )
  return init(rng)


def bytes_per_device(tree) -> int:
  """Bytes of `tree`'s shards on the first local device (to show what FSDP saves)."""
  device = jax.local_devices()[0]
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total
