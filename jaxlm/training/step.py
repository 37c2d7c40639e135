"""The train and eval steps: pure module-level functions, jitted once by the loop.

Static pieces (model, objectives, optimizer) are bound with `functools.partial` before `jax.jit`;
what changes per call (state, batch, rng) is an argument. The step never names an objective.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.data.tokenizer import PAD_ID
from jaxlm.objectives import Objective
from jaxlm.parallel import axes
from jaxlm.training.state import TrainState

Metrics = dict[str, jax.Array]
# (trained params, frozen params) -> the parameters the model runs on (fine-tuning with LoRA).
Merge = Callable[[Any, Any], Any]


def objective_losses(
    objectives: Sequence[Objective], outputs: Mapping[str, jax.Array], batch
) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
  """The weighted sum of the enabled objectives' losses, and all their `(sum, count)` metrics."""
  total = jnp.zeros((), jnp.float32)
  aux = {}
  for objective in objectives:
    loss, metrics = objective.loss(outputs, batch)
    total = total + objective.weight * loss
    aux.update(metrics)
  return total, aux


def train_step(
    state: TrainState,
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    frozen: Any = None,
    *,
    model: nn.Module,
    objectives: Sequence[Objective],
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    microbatches: int = 1,
    merge: Merge | None = None,
) -> tuple[TrainState, Metrics]:
  """One optimizer step. A step with a non-finite loss or gradient changes nothing but `step`.

  With `microbatches` > 1 the batch is processed in that many slices, one after the other, and
  their gradients are averaged: the memory of one slice, the update of the whole batch (the
  mean of the slices' mean losses; metrics add up exactly).

  The skip is a select, not a scaled update: 0 x NaN is NaN, and optax.apply_if_finite would
  eventually apply a bad update. The loop counts skips and stops the run.

  With `merge`, `state.params` are only what trains (LoRA's adapters and the new head) and the
  model runs on `merge(state.params, frozen)`; gradients and optimizer state cover only them.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params, batch, dropout_rng):
    outputs = model.apply(
        {"params": merge(params, frozen) if merge else params}, batch, deterministic=False,
        rngs={"dropout": dropout_rng}
    )
    return objective_losses(objectives, outputs, batch)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (loss, aux), grads = grad_fn(state.params, batch, dropout_rng)
  else:
    loss, aux, grads = _accumulate(grad_fn, state.params, batch, dropout_rng, microbatches)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
  )
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": optax.tree.norm(new_state.params),
      "update_norm": optax.tree.norm(updates),
      # The schedule follows the optimizer's own count, which skipped steps do not advance.
      "learning_rate": schedule(_optimizer_count(state.opt_state)),
      "skipped": (~finite).astype(jnp.int32),
      # Non-padding positions per row: what packing (data.pack_examples) raises.
      "text_tokens/sum": jnp.sum(batch["input_ids"] != PAD_ID).astype(jnp.float32),
      "text_tokens/count": jnp.asarray(batch["input_ids"].shape[0], jnp.float32),
  }
  for name, (total, count) in aux.items():
    metrics[name + "/sum"] = total
    metrics[name + "/count"] = count
  return new_state, metrics


def _optimizer_count(opt_state) -> jax.Array:
  """Updates applied so far (optax's count; skipped steps are not counted)."""
  counts = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
  return counts[0][1] if counts else jnp.zeros((), jnp.int32)


def _accumulate(grad_fn, params, batch, dropout_rng, microbatches: int):
  """Mean loss and gradients over `microbatches` slices of the batch, in a `lax.scan`.

  Slice i takes examples i, i + k, i + 2k, ... so every slice stays split over the data devices.
  """

  def split(x):
    x = x.reshape((x.shape[0] // microbatches, microbatches) + x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, axes.BATCH) + (None,) * (x.ndim - 2))

  slices = jax.tree_util.tree_map(split, batch)

  def body(carry, inputs):
    index, piece = inputs
    (loss, aux), grads = grad_fn(params, piece, jax.random.fold_in(dropout_rng, index))
    return jax.tree_util.tree_map(jnp.add, carry, (loss, aux, grads)), None

  first = jax.tree_util.tree_map(lambda x: x[0], slices)
  (_, aux_shape), grads_shape = jax.eval_shape(grad_fn, params, first, dropout_rng)
  zeros = jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, s.dtype), (jax.ShapeDtypeStruct((), jnp.float32), aux_shape,
                                              grads_shape))
  (loss, aux, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(microbatches), slices))
  scale = 1.0 / microbatches
  return loss * scale, aux, jax.tree_util.tree_map(lambda g: g * scale, grads)


def eval_step(
    params,
    batch: Mapping[str, jax.Array],
    frozen: Any = None,
    *,
    model: nn.Module,
    objectives: Sequence[Objective],
    merge: Merge | None = None,
) -> Metrics:
  """Objective metrics on one batch without dropout, as sums and counts to add up over batches."""
  outputs = model.apply({"params": merge(params, frozen) if merge else params}, batch,
                        deterministic=True)
  loss, aux = objective_losses(objectives, outputs, batch)
  metrics = {"loss/sum": loss, "loss/count": jnp.ones((), jnp.float32)}
  for name, (total, count) in aux.items():
    metrics[name + "/sum"] = total
    metrics[name + "/count"] = count
  return metrics
