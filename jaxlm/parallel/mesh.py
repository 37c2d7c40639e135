"""Building the device mesh from `config.mesh` (data x fsdp x tensor)."""

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils

from jaxlm.errors import UserError

AXES = ("data", "fsdp", "tensor")


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> tuple[int, int, int]:
  """Resolves `-1` (all remaining devices) and checks the product is the device count."""
  sizes = [int(config[a]) for a in AXES]
  free = [a for a, s in zip(AXES, sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(
        f"mesh {dict(zip(AXES, sizes))}: each of mesh.data, mesh.fsdp, mesh.tensor must be a "
        "positive size, and at most one may be -1 (all remaining devices)."
    )
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if device_count % fixed:
      raise UserError(
          f"mesh {dict(zip(AXES, sizes))}: the fixed axes ({fixed}) do not divide the "
          f"{device_count} devices, so '{free[0]}=-1' has no size. Choose sizes whose product "
          f"divides {device_count}."
      )
    sizes[AXES.index(free[0])] = device_count // fixed
  if math.prod(sizes) != device_count:
    raise UserError(
        f"mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but "
        f"{device_count} are available. Make mesh.data x mesh.fsdp x mesh.tensor equal "
        f"{device_count}, or set one axis to -1."
    )
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """A mesh with axes ('data', 'fsdp', 'tensor') over all devices (or `devices`)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError):  # No topology-aware layout for this shape.
    grid = np.asarray(devices).reshape(shape)
  return jax.sharding.Mesh(grid, AXES)


def wait_for_processes(name: str, timeout_s: int = 1800) -> None:
  """Blocks until every process of a multi-process run reaches `name` (no-op with one process).

  Through the coordination service's barrier, not a device collective: the CPU backend's first
  collective sets up its gloo context with a fixed 30 s wait for the peers, which a process still
  compiling on a loaded host misses (seen: a 53 s compile). Called after each compile, so the
  step's collectives start together.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # The client jax's own array serialization waits on.

  client = distributed.global_state.client
  if client is not None:
    client.wait_at_barrier(f"jaxlm:{name}", timeout_in_ms=timeout_s * 1000)
