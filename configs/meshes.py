"""Mesh presets for `config.mesh`: `config.mesh = meshes.fsdp()` in an experiment file."""

import ml_collections


def _mesh(data: int, fsdp: int, tensor: int, rules: str = "") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=rules))


def data_parallel() -> ml_collections.ConfigDict:
  """Every device holds all parameters; the batch is split (small models)."""
  return _mesh(-1, 1, 1)


def fsdp() -> ml_collections.ConfigDict:
  """Parameters and optimizer state sharded over every device (ZeRO-3; large models)."""
  return _mesh(1, -1, 1)


def fsdp_tensor(tensor: int = 4) -> ml_collections.ConfigDict:
  """FSDP across hosts and `tensor`-way Megatron splits inside one (very large models)."""
  return _mesh(1, -1, tensor)
