"""Evaluation on fixed eval sets: every objective's loss and accuracy, summed over whole sets.

Shared by the trainer (every `train.eval_every` steps) and `python -m jaxlm.evaluate` (a saved
checkpoint), so both report the same numbers for the same parameters.
"""

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxlm.objectives import Objective
from jaxlm.training import step as step_lib

# name -> (the objectives evaluated on it, its fixed loader: `.steps` batches by `.batch(k)`)
EvalSets = dict[str, tuple[Sequence[Objective], Any]]


def global_batch(host_batch: Mapping[str, np.ndarray], sharding, process_count: int) -> dict:
  """One global array per key from each process's rows."""
  return {
      k: jax.make_array_from_process_local_data(
          sharding, v, (v.shape[0] * process_count,) + v.shape[1:])
      for k, v in host_batch.items()
  }


def batch_shapes(host_batch: Mapping[str, np.ndarray], process_count: int
                 ) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, jax.ShapeDtypeStruct]]:
  """The global batch's shapes (every process's rows), and a one-row batch's (enough to give
  every parameter its shape)."""
  def rows(v, n):
    return jax.ShapeDtypeStruct((n,) + v.shape[1:], v.dtype)

  return ({k: rows(v, v.shape[0] * process_count) for k, v in host_batch.items()},
          {k: rows(v, 1) for k, v in host_batch.items()})


def ratios(sums: Mapping[str, float], prefix: str = "") -> dict[str, float]:
  """`name/sum` and `name/count` pairs to `prefix + name` = sum / count."""
  out = {}
  for key, value in sums.items():
    if key.endswith("/sum"):
      name = key[: -len("/sum")]
      out[prefix + name] = value / max(sums[name + "/count"], 1e-9)
  return out


class Evaluator:
  """Runs each eval set through the heads of the objectives it evaluates; `eval/loss` is their
  weighted sum, and token objectives add a perplexity of the set's token-weighted mean loss.

  The batches are built once (this process's rows) and kept: the sets are fixed.
  """

  def __init__(self, model: nn.Module, objectives: Sequence[Objective], eval_sets: EvalSets, *,
               params_sharding, batch_sharding, replicated,
               merge: Callable[[Any, Any], Any] | None = None):
    self._objectives = list(objectives)
    self._sets = eval_sets
    self._batch_sharding = batch_sharding
    self._batches: dict[str, list] = {}
    # Each eval set runs only the heads of the objectives it evaluates (the pairs set, no MLM).
    self._fns = {
        name: jax.jit(
            functools.partial(
                step_lib.eval_step, objectives=chosen, merge=merge,
                model=model.clone(heads=tuple(
                    (n, h) for n, h in model.heads if n in {o.name for o in chosen}))),
            in_shardings=(params_sharding, batch_sharding, None),
            out_shardings=replicated,
        )
        for name, (chosen, _) in eval_sets.items()
    }

  def __call__(self, params, frozen=None) -> dict[str, float]:
    process_count = jax.process_count()
    sums: dict[str, float] = {}
    for name, (_, loader) in self._sets.items():
      if name not in self._batches:
        self._batches[name] = [loader.batch(k) for k in range(loader.steps)]
      for host_batch in self._batches[name]:
        batch = global_batch(host_batch, self._batch_sharding, process_count)
        for key, value in jax.device_get(self._fns[name](params, batch, frozen)).items():
          if not key.startswith("loss/"):
            sums[key] = sums.get(key, 0.0) + float(value)
    row = ratios(sums, "eval/")
    loss = sum(o.weight * row[f"eval/{o.name}_loss"] for o in self._objectives)
    for o in self._objectives:
      if o.perplexity:
        row[f"eval/{o.name}_perplexity"] = math.exp(min(row[f"eval/{o.name}_loss"], 700.0))
    return {"eval/loss": loss, **row}


def evaluate_run(workdir: str, config=None, step: int | None = None, *,
                 write: bool = True) -> dict[str, float]:
  """Evaluates the checkpoint of a trained run (parameters only) on its fixed eval sets, as
  its training did; appends the row to `<workdir>/metrics.jsonl` when `write`."""
  from jaxlm.data import batch_schedule
  from jaxlm.parallel import rules as rules_lib
  from jaxlm.training import flops, inputs, pretrained

  run = pretrained.load(workdir, step, config)
  config = run.config
  _, objectives, _, eval_sets = inputs.build_inputs(
      config, workdir, run.model_config.vocab_size, jax.process_index(), jax.process_count())
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    evaluator = Evaluator(
        run.model, objectives, eval_sets,
        params_sharding=jax.tree_util.tree_map(lambda x: x.sharding, run.params),
        batch_sharding=rules_lib.batch_sharding(run.mesh, run.rules),
        replicated=rules_lib.replicated(run.mesh))
    row = evaluator(run.params)
  d = config.data
  ramp = batch_schedule.from_config(config)
  rows_by_size = ramp.rows_by_size(run.step) if ramp else {d.batch_size: run.step * d.batch_size}
  row.update(tokens_seen=sum(rows_by_size.values()) * d.seq_len, model_flops=sum(
      rows * d.seq_len * flops.training_flops_per_token(
          run.model_config, d.seq_len, objectives, rows_per_step=size)
      for size, rows in rows_by_size.items()))
  if write and jax.process_index() == 0:
    _append_row(workdir, run.step, row)
  return {"step": run.step, **row}


def _append_row(workdir: str, step: int, row: Mapping[str, float]) -> None:
  """Appends without touching earlier rows (the training writer cuts the file on resume)."""
  import json
  import os

  with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in row.items()}}) + "\n")


def format_table(row: Mapping[str, float]) -> str:
  """One line per objective: loss, accuracy and perplexity (where it has them)."""
  names = sorted({k[len("eval/"):].rsplit("_", 1)[0] for k in row
                  if k.startswith("eval/") and k.endswith("_loss")})
  lines = [f"step {int(row['step'])}: eval/loss {row['eval/loss']:.4f}",
           f"{'objective':<12}{'loss':>10}{'accuracy':>10}{'perplexity':>12}"]
  def cell(key, fmt):
    return format(row[key], fmt) if key in row else "-"

  for name in names:
    lines.append(f"{name:<12}{cell(f'eval/{name}_loss', '.4f'):>10}"
                 f"{cell(f'eval/{name}_accuracy', '.4f'):>10}"
                 f"{cell(f'eval/{name}_perplexity', '.2f'):>12}")
  return "\n".join(lines)
