"""The reusable trainer: one loop for pretraining and fine-tuning.

A `Task` says what differs between them (the model and objectives, the data, where parameters
start and which of them train); `fit` does the rest the same way for both: the mesh and
shardings, resume from the newest good checkpoint, the jitted step, log rows, periodic
evaluation, checkpoints and preemption.

Resume order: the newest checkpoint in `<workdir>/checkpoints` that restores, else a fresh
start. The data position is the step (the loaders are pure functions of it), so restoring the
state restores the data stream too.
"""

import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm.data import setup as data_setup, shards
from jaxlm.data.batch_schedule import BatchSchedule
from jaxlm.errors import UserError
from jaxlm.objectives import Objective
from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib
from jaxlm.training import checkpoints, evaluation, flops, optimizer, preemption, profiling
from jaxlm.training import provenance
from jaxlm.training import state as state_lib, step as step_lib, workdir as workdir_lib
from jaxlm.training.interval import Interval, account
from jaxlm.training.metrics import MetricWriter


@dataclasses.dataclass
class Trainable:
  """Which parameters train. The default, all of them; LoRA: adapters and the new head, with
  the rest frozen and passed to the step beside the state (never in the optimizer or the
  checkpoint)."""

  # (rng, the model's boxed parameters) -> the boxed parameters that train.
  select: state_lib.Select | None = None
  # (trained, frozen) -> the parameters the model runs on.
  merge: step_lib.Merge | None = None


@dataclasses.dataclass
class Task:
  """What a run trains and on what: everything in which pretraining and fine-tuning differ."""

  model: nn.Module
  objectives: Sequence[Objective]
  # `.batch(step)` and `.iterate(start, stop, workers=...)` of host rows; `.schedule`, the
  # global batch by step (a BatchSchedule of a batch-size ramp, or None: data.batch_size).
  train_loader: Any
  eval_sets: evaluation.EvalSets
  data_fingerprint: str
  data_description: dict  # Written to `<workdir>/dataset.json`.
  flops_per_token: float  # Model FLOPs of one training token, for `mfu` and `model_flops`.
  # The starting parameters from freshly initialised ones (fine-tuning: the pretrained encoder);
  # applied on a fresh start, and to the frozen parameters on every start.
  initial_params: Callable[[Any], Any] | None = None
  trainable: Trainable = dataclasses.field(default_factory=Trainable)
  extra_position: dict = dataclasses.field(default_factory=dict)  # Saved with checkpoints.


def seed_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """The parameter-init and dropout keys, from `seeds.init` and `seeds.dropout` (the data seed
  goes to the loader). With both derived from train.seed they are the keys used before the
  seeds were split, so existing runs give the same numbers.

  The dropout key is of `train.prng_impl`'s implementation (the step folds the step number into
  it, so no key is ever saved: a resumed run draws what it would have drawn). Initialisation
  keeps threefry: parameters do not depend on the dropout generator."""
  seeds = config_lib.resolved_seeds(config)
  impl = config_lib.PRNG_IMPLS[config.train.prng_impl]
  return (jax.random.fold_in(jax.random.key(seeds["init"]), 0),
          jax.random.fold_in(jax.random.key(seeds["dropout"], impl=impl), 1))


def make_mesh(config: ml_collections.ConfigDict, process_count: int) -> jax.sharding.Mesh:
  """The run's mesh, checked against the processes and the batch it must split."""
  t, d = config.train, config.data
  mesh = mesh_lib.make_mesh(config.mesh)
  if (mesh.shape["data"] * mesh.shape["fsdp"]) % process_count:
    raise UserError(
        f"mesh.data x mesh.fsdp ({mesh.shape['data'] * mesh.shape['fsdp']}) must be a multiple "
        f"of the {process_count} processes, so that each process feeds whole batch shards."
    )
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"] * t.microbatches
  if d.batch_size % batch_ways:
    raise UserError(
        f"data.batch_size ({d.batch_size}) is not divisible by the data-parallel devices times "
        f"the micro-batches (mesh.data x mesh.fsdp x train.microbatches = {batch_ways}). Use a "
        f"multiple of {batch_ways}."
    )
  # Every ramp batch is a multiple of the first. Fine-tuning configs have no ramp keys.
  ramp_start = t.get("batch_ramp_start", 0) if t.get("batch_ramp_steps", 0) else 0
  if ramp_start % batch_ways:
    raise UserError(
        f"train.batch_ramp_start ({ramp_start}) is not divisible by the data-parallel devices "
        f"times the micro-batches (mesh.data x mesh.fsdp x train.microbatches = {batch_ways}), "
        f"so the ramp's batches would not split over them. Use a multiple of {batch_ways}."
    )
  return mesh


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`<workdir>/config.json`: what `evaluate`, `predict` and `export` read the run back with."""
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def fit(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict[str, float]:
  """Trains (or resumes) `task` as `config.train` and `config.optimizer` say; returns the last
  row (training and eval metrics)."""
  process_count = jax.process_count()
  is_main = jax.process_index() == 0
  t, d = config.train, config.data
  mesh = make_mesh(config, process_count)
  rules = rules_lib.rules_from_config(config.mesh)
  model, objectives, trainable = task.model, task.objectives, task.trainable
  tx, schedule = optimizer.make_optimizer(config.optimizer, t.steps)
  # Without a ramp, the constant schedule: one batch size, the same arithmetic as before.
  ramp = task.train_loader.schedule
  schedule_of_batches = ramp or BatchSchedule(d.batch_size, 0, 0)
  first = task.train_loader.batch(0)
  global_shapes, init_batch = evaluation.batch_shapes(first, process_count)
  batch_sharding = rules_lib.batch_sharding(mesh, rules)
  replicated = rules_lib.replicated(mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # Made under the mesh, as every array the step takes: on several processes a key made
    # outside it is process-local and cannot be placed on the global mesh.
    init_rng, dropout_rng = seed_keys(config)
    abstract, shardings = state_lib.abstract_state(model, tx, init_batch, mesh, rules,
                                                   select=trainable.select)
    workdir_lib.check_disk_space(workdir, abstract)
    frozen = None
    if trainable.merge is not None:  # Rebuilt identically on every start, never saved.
      frozen_abstract = state_lib.abstract_params(model, init_batch, mesh, rules)
      frozen = state_lib.init_params(init_rng, model, init_batch, frozen_abstract)
      if task.initial_params:
        frozen = task.initial_params(frozen)
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            keep=t.keep_checkpoints)
    restored = checkpointer.restore_newest(abstract)
    position: dict = {}
    if restored is None:
      state = state_lib.init_state(init_rng, model, tx, init_batch, shardings,
                                   select=trainable.select)
      if task.initial_params and trainable.merge is None:
        state = state.replace(params=task.initial_params(state.params))
      start = 0
    else:
      state, position = restored
      start = int(state.step)
      data_setup.check_fingerprint(position.get("data_fingerprint"), task.data_fingerprint,
                                   d.allow_data_change)
      if position.get("global_batch_size") != d.batch_size:
        logging.warning("Resuming with data.batch_size %d, saved with %s: the data stream moves.",
                        d.batch_size, position.get("global_batch_size"))
      # Checkpoints from before the ramp existed record none: their runs had none.
      saved_ramp = position.get("batch_ramp")
      if saved_ramp != (ramp.to_json() if ramp else None):
        logging.warning("Resuming with batch-size ramp %s, saved with %s: the data stream moves "
                        "and the batch sizes of the remaining steps change.",
                        ramp.to_json() if ramp else None, saved_ramp)
      logging.info("Resumed from the checkpoint at step %d", start)
    if is_main:  # After the check above: a refused resume leaves the records as they were.
      write_config(config, workdir)
      previous = provenance.last_start(workdir) if restored is not None else None
      previous_steps = previous["config"]["train"]["steps"] if previous else None
      for warning in (config_lib.recipe_warnings(config)
                      + config_lib.resume_warnings(config, previous_steps)):
        logging.warning("Recipe: %s", warning)
      shards.write_json(os.path.join(workdir, data_setup.DATASET_FILE), task.data_description)
      provenance.append_start(workdir, config, start_step=start,
                              data_fingerprint=task.data_fingerprint)
    trained_count = sum(x.size for x in jax.tree_util.tree_leaves(abstract.params))
    logging.info(
        "Trained parameters: %d (%.1f MiB per device)%s; optimizer state: %.1f MiB per "
        "device; mesh %s", trained_count, state_lib.bytes_per_device(state.params) / 2**20,
        f", frozen: {sum(x.size for x in jax.tree_util.tree_leaves(frozen))}"
        if frozen is not None else "",
        state_lib.bytes_per_device(state.opt_state) / 2**20, dict(mesh.shape))

    frozen_sharding = (None if frozen is None
                       else jax.tree_util.tree_map(lambda x: x.sharding, frozen))
    train_fn = jax.jit(
        functools.partial(step_lib.train_step, model=model, objectives=objectives, tx=tx,
                          schedule=schedule, microbatches=t.microbatches, merge=trainable.merge),
        in_shardings=(shardings, batch_sharding, replicated, frozen_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    evaluate = evaluation.Evaluator(model, objectives, task.eval_sets,
                                    params_sharding=shardings.params,
                                    batch_sharding=batch_sharding, replicated=replicated,
                                    merge=trainable.merge)
    dropout_rng = jax.device_put(dropout_rng, replicated)
    compiled_steps: dict[int, Any] = {}  # Global batch -> the step compiled for it.

    def compiled_step(size: int):
      """The step for a global batch of `size` rows, compiled on first use (a ramp: once per
      stage)."""
      if size not in compiled_steps:
        compile_start = time.perf_counter()
        shapes = {k: jax.ShapeDtypeStruct((size,) + v.shape[1:], v.dtype)
                  for k, v in global_shapes.items()}
        compiled_steps[size] = train_fn.lower(abstract, shapes, dropout_rng, frozen).compile()
        logging.info("Train step compiled in %.1f s%s", time.perf_counter() - compile_start,
                     f" for a global batch of {size}" if ramp else "")
        mesh_lib.wait_for_processes(f"step compiled for {size}")
      return compiled_steps[size]

    compiled_step(schedule_of_batches.size(start))

    def rows_before(step: int) -> int:
      return schedule_of_batches.offset(step)

    def model_flops(step: int) -> float:
      """Model FLOPs of the steps before `step`. Under a ramp by batch size: relative
      attention's per-step work is shared by a step's rows (`flops.encoder_flops_per_token`)."""
      if ramp is None:
        return rows_before(step) * d.seq_len * task.flops_per_token
      return sum(rows * d.seq_len * flops.training_flops_per_token(
          model.config, d.seq_len, objectives, rows_per_step=size)
          for size, rows in ramp.rows_by_size(step).items())

    # On CPU the measured matmul peak of this host (cached per host), else the datasheet's.
    peak, peak_source = flops.peak_flops(t.peak_tflops_per_device)
    logging.info("Peak for MFU: %.3g FLOP/s (%s)", peak, peak_source)

    stop = preemption.StopRequest(checkpointer.reached_preemption, process_count > 1)
    profiler = profiling.StepProfiler(
        config_lib.profile_range(t), start,
        profiling.profile_dir(workdir, jax.process_index(), process_count))
    writer = MetricWriter(workdir, resume_step=start, enabled=is_main)
    # The partial log interval and skip count travel with the checkpoint, so the rows of a
    # resumed run equal those of an uninterrupted one.
    interval = Interval(position.get("interval"))
    consecutive_skips = int(position.get("consecutive_skips", 0))
    # Cumulative counts of logged intervals (the open interval travels in `interval`).
    predicted_tokens = float(position.get("predicted_tokens", 0.0))
    token_objectives = [o.name for o in objectives if o.perplexity]
    last_row: dict[str, float] = {}
    pending = None
    interactive = is_main and sys.stderr.isatty()
    progress = tqdm(total=t.steps, initial=start, disable=not interactive, unit="step",
                    dynamic_ncols=True)
    try:
      for step, host_batch in task.train_loader.iterate(start, t.steps, workers=d.workers):
        batch = evaluation.global_batch(host_batch, batch_sharding, process_count)
        done = step + 1
        profiler.before(done)
        size = schedule_of_batches.size(step)
        if size not in compiled_steps:  # A new ramp stage: its compile is not training time.
          compile_started = time.perf_counter()
          compiled_step(size)
          interval.started += time.perf_counter() - compile_started
        state, metrics = compiled_steps[size](state, batch, dropout_rng, frozen)
        profiler.after(done, (state, metrics))
        if pending is not None:
          consecutive_skips = account(interval, pending, consecutive_skips, t, checkpointer)
        pending = metrics
        progress.update(1)
        if done == 1 or done % t.log_every == 0 or done == t.steps:
          consecutive_skips = account(interval, pending, consecutive_skips, t, checkpointer)
          pending = None
          elapsed = time.perf_counter() - interval.started
          timed_rows = rows_before(done) - rows_before(done - interval.timed_steps)
          tokens_per_sec = timed_rows * d.seq_len / max(elapsed, 1e-9)
          interval_rows = rows_before(done) - rows_before(done - interval.steps)
          row = evaluation.ratios(interval.sums)
          row.update(
              learning_rate=interval.last["learning_rate"],
              tokens_per_sec=tokens_per_sec,
              # Of which text, not padding (`text_tokens`: per row).
              text_tokens_per_sec=tokens_per_sec * row.get("text_tokens", d.seq_len) / d.seq_len,
              # Model FLOPs of the predictions actually made in the interval (MLM's count).
              mfu=flops.training_flops_per_token(
                  model.config, d.seq_len, objectives,
                  {name: interval.sums.get(f"{name}_loss/count", 0.0)
                   / max(interval_rows, 1) for name in token_objectives},
                  rows_per_step=interval_rows // max(interval.steps, 1),
              ) * tokens_per_sec / peak if peak else 0.0,
              skipped_steps=interval.skipped,
          )
          row.pop("skipped", None)
          for name in token_objectives:
            count = interval.sums.get(f"{name}_loss/count", 0.0)
            predicted_tokens += count
            row[f"{name}_predicted_per_step"] = count / max(interval.steps, 1)
          row.update(tokens_seen=rows_before(done) * d.seq_len, predicted_tokens=predicted_tokens,
                     model_flops=model_flops(done))
          writer.write(done, row)
          last_row = row
          progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
          if not interactive:  # A log line instead of a bar when stderr is a file.
            logging.info("step %d/%d: loss %.4f, %s tokens/s", done, t.steps, row["loss"],
                         f"{tokens_per_sec:,.0f}")
          interval.reset()
        if done % t.eval_every == 0 or done == t.steps:
          eval_started = time.perf_counter()
          eval_row = evaluate(state.params, frozen)
          writer.write(done, {**eval_row, "tokens_seen": rows_before(done) * d.seq_len,
                              "model_flops": model_flops(done)})
          last_row = {**last_row, **eval_row}
          logging.info("step %d: %s", done,
                       json.dumps({k: round(v, 4) for k, v in eval_row.items()}))
          interval.started += time.perf_counter() - eval_started  # Not training time.
        stopping = stop.should_stop(done)
        if done % t.checkpoint_every == 0 or done == t.steps or stopping:
          if pending is not None:
            consecutive_skips = account(interval, pending, consecutive_skips, t, checkpointer)
            pending = None
          stalled = checkpointer.save(done, state, {
              "step": done, "global_batch_size": d.batch_size, "interval": interval.to_json(),
              "batch_ramp": ramp.to_json() if ramp else None,
              "data_fingerprint": task.data_fingerprint,
              "consecutive_skips": consecutive_skips, "predicted_tokens": predicted_tokens,
              **task.extra_position})
          logging.info("Checkpoint of step %d started; the loop waited %.2f s", done, stalled)
        if stopping:
          logging.warning("Stopped at step %d on request; the checkpoint holds it. Run the "
                          "same command to continue.", done)
          break
      checkpointer.wait()
    finally:
      profiler.stop()
      stop.restore()
      progress.close()
      writer.close()
      checkpointer.close()
  return last_row
