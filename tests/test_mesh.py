"""The device mesh and parameter shardings, on 8 simulated CPU devices.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it when
XLA_FLAGS names no device count).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import optimizers
from jaxlm.errors import UserError
from jaxlm.models import MlmHead, ModelConfig, NspHead, Pretrainer
from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib
from jaxlm.training import optimizer, state as state_lib

DEVICES = 8
# Every dimension a rule may split is divisible by 8.
CONFIG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, mlp_dim=256,
                     max_position=32)
BATCH = {
    "input_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
    "token_type_ids": jax.ShapeDtypeStruct((1, 16), jnp.int32),
    "mlm_positions": jax.ShapeDtypeStruct((1, 4), jnp.int32),
}


@pytest.fixture(scope="module")
def cpu_devices():
  devices = jax.devices("cpu")
  assert len(devices) >= DEVICES, (
      f"The mesh tests need {DEVICES} CPU devices but JAX has {len(devices)}. Set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} before starting pytest.")
  return devices[:DEVICES]


def _mesh_config(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=""))


@pytest.mark.parametrize(
    "sizes, want",
    [
        ((-1, 1, 1), (8, 1, 1)),
        ((1, -1, 1), (1, 8, 1)),
        ((2, -1, 2), (2, 2, 2)),
        ((1, 1, -1), (1, 1, 8)),
        ((2, 4, 1), (2, 4, 1)),
    ],
)
def test_mesh_shape_resolves_the_free_axis(sizes, want):
  assert mesh_lib.mesh_shape(_mesh_config(*sizes), 8) == want


@pytest.mark.parametrize(
    "sizes, words",
    [
        ((3, 1, 1), ["3 devices", "8 are available"]),  # Product too small.
        ((4, 4, 1), ["16 devices"]),  # Product too large.
        ((3, -1, 1), ["do not divide"]),  # The free axis has no integer size.
        ((-1, -1, 1), ["at most one"]),
        ((0, 1, 8), ["positive"]),
        ((-2, 4, 1), ["positive"]),
    ],
)
def test_mesh_shape_rejects_impossible_meshes(sizes, words):
  with pytest.raises(UserError) as raised:
    mesh_lib.mesh_shape(_mesh_config(*sizes), 8)
  for word in words:
    assert word in str(raised.value)


def test_make_mesh_uses_every_device(cpu_devices):
  mesh = mesh_lib.make_mesh(_mesh_config(2, -1, 2), devices=cpu_devices)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in cpu_devices)


def _state(cpu_devices, sizes, config=CONFIG, rules=rules_lib.DEFAULT_RULES):
  mesh = mesh_lib.make_mesh(_mesh_config(*sizes), devices=cpu_devices)
  model = Pretrainer(config, heads=(("mlm", MlmHead), ("nsp", NspHead)))
  tx, _ = optimizer.make_optimizer(optimizers.adamw_bert(), 100)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract, shardings = state_lib.abstract_state(model, tx, BATCH, mesh, rules)
    state = state_lib.init_state(jax.random.key(0), model, tx, BATCH, shardings)
  return mesh, abstract, state


@pytest.fixture(scope="module")
def fsdp_state(cpu_devices):
  return _state(cpu_devices, (1, 8, 1))


@pytest.fixture(scope="module")
def replicated_state(cpu_devices):
  return _state(cpu_devices, (8, 1, 1))


def _mlp_kernel(params):
  return params["encoder"]["layer_0"]["mlp"]["wi"]["kernel"]


def _spec(array):
  """A PartitionSpec as a tuple, with axes of size-1 tuples unwrapped and trailing None cut."""
  spec = [a[0] if isinstance(a, tuple) and len(a) == 1 else a for a in array.sharding.spec]
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


def test_fsdp_shards_the_embed_axis(fsdp_state):
  mesh, abstract, state = fsdp_state
  kernel = _mlp_kernel(state.params)  # Logical axes ('embed', 'mlp').
  assert _spec(kernel)[0] == "fsdp"
  assert kernel.sharding.mesh.shape == mesh.shape
  shard_shapes = {s.data.shape for s in kernel.addressable_shards}
  assert shard_shapes == {(CONFIG.hidden_size // 8, CONFIG.mlp_dim)}
  # Adam's moments are sharded like their parameters.
  adam = next(s for s in state.opt_state if hasattr(s, "mu"))
  mu = adam.mu
  assert _mlp_kernel(mu).sharding == kernel.sharding
  # The abstract state carries the shardings the state was born with.
  assert _mlp_kernel(abstract.params).sharding == kernel.sharding


def test_data_fsdp_tensor_mesh(cpu_devices):
  _, _, state = _state(cpu_devices, (2, 2, 2))
  assert _spec(_mlp_kernel(state.params)) == ("fsdp", "tensor")
  wo = state.params["encoder"]["layer_0"]["mlp"]["wo"]["kernel"]  # ('mlp', 'embed').
  assert _spec(wo) == ("tensor", "fsdp")
  query = state.params["encoder"]["layer_0"]["attention"]["query"]["kernel"]  # embed, heads, kv.
  assert _spec(query) == ("fsdp", "tensor")
  token = state.params["encoder"]["embeddings"]["token"]["embedding"]  # vocab, embed.
  assert _spec(token) == ("tensor", "fsdp")
  assert {s.data.shape for s in _mlp_kernel(state.params).addressable_shards} == {
      (CONFIG.hidden_size // 2, CONFIG.mlp_dim // 2)}


def test_fsdp_divides_parameter_memory(fsdp_state):
  _, _, state = fsdp_state
  total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params))
  per_device = state_lib.bytes_per_device(state.params)
  assert per_device <= total / 6, (per_device, total)
  opt_total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.opt_state))
  assert state_lib.bytes_per_device(state.opt_state) <= opt_total / 6


def test_replicated_parameters_are_whole_on_every_device(replicated_state):
  _, _, state = replicated_state
  total = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params))
  assert state_lib.bytes_per_device(state.params) == total
  kernel = _mlp_kernel(state.params)
  for shard in kernel.addressable_shards:
    np.testing.assert_array_equal(shard.data, kernel)


def test_sharded_initialisation_gives_the_same_parameters(fsdp_state, replicated_state):
  """Parameters are the same whatever the mesh: only their placement differs."""
  _, _, sharded = fsdp_state
  _, _, replicated = replicated_state
  for a, b in zip(jax.tree_util.tree_leaves(sharded.params),
                  jax.tree_util.tree_leaves(replicated.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_rules_from_config_replace_defaults():
  config = _mesh_config()
  config.rules = "mlp=none,vocab=fsdp+tensor"
  rules = dict(rules_lib.rules_from_config(config))
  assert rules["mlp"] is None and rules["vocab"] == ("fsdp", "tensor")
  assert rules["embed"] == "fsdp"
  assert len(rules) == len(rules_lib.DEFAULT_RULES)


def test_batch_sharding_splits_over_data_and_fsdp(cpu_devices):
  mesh = mesh_lib.make_mesh(_mesh_config(2, 2, 2), devices=cpu_devices)
  sharding = rules_lib.batch_sharding(mesh, rules_lib.DEFAULT_RULES)
  batch = jax.device_put(np.zeros((8, 16), np.int32), sharding)
  assert {s.data.shape for s in batch.addressable_shards} == {(2, 16)}


def test_indivisible_parameter_is_named(cpu_devices):
  bad = ModelConfig(vocab_size=128, hidden_size=36, num_layers=1, num_heads=2, mlp_dim=64,
                    max_position=32)
  with pytest.raises(UserError) as raised:
    _state(cpu_devices, (1, 8, 1), config=bad)
  message = str(raised.value)
  assert "Parameter ['encoder']" in message and "(36,)" in message
  assert "36 is not divisible by 8" in message
  assert "fsdp" in message
