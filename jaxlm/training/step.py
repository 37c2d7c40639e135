"""The train and eval steps: pure module-level functions, jitted once by the loop.

Static pieces (model, objectives, optimizer) are bound with `functools.partial` before `jax.jit`;
what changes per call (state, batch, rng) is an argument. The step never names an objective.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.objectives import Objective
from jaxlm.training.state import TrainState

Metrics = dict[str, jax.Array]


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
    *,
    model: nn.Module,
    objectives: Sequence[Objective],
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, Metrics]:
  """One optimizer step. A step with a non-finite loss or gradient changes nothing but `step`.

  The skip is a select, not a scaled update: 0 x NaN is NaN, and optax.apply_if_finite would
  eventually apply a bad update. The loop counts skips and stops the run.
  """
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    outputs = model.apply(
        {"params": params}, batch, deterministic=False, rngs={"dropout": dropout_rng}
    )
    return objective_losses(objectives, outputs, batch)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
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
      "learning_rate": schedule(state.step),
      "skipped": (~finite).astype(jnp.int32),
  }
  for name, (total, count) in aux.items():
    metrics[name + "/sum"] = total
    metrics[name + "/count"] = count
  return new_state, metrics


def eval_step(
    params,
    batch: Mapping[str, jax.Array],
    *,
    model: nn.Module,
    objectives: Sequence[Objective],
) -> Metrics:
  """Objective metrics on one batch without dropout, as sums and counts to add up over batches."""
  outputs = model.apply({"params": params}, batch, deterministic=True)
  loss, aux = objective_losses(objectives, outputs, batch)
  metrics = {"loss/sum": loss, "loss/count": jnp.ones((), jnp.float32)}
  for name, (total, count) in aux.items():
    metrics[name + "/sum"] = total
    metrics[name + "/count"] = count
  return metrics
