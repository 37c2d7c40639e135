"""The training loop: set up, resume, step, log, evaluate, checkpoint.

Resume order: the newest checkpoint in `<workdir>/checkpoints` that restores, else a fresh
start. The data position is the step (the loader is a pure function of it), so restoring the
state restores the data stream too.
"""

import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from jaxlm import config as config_lib
from jaxlm.data import setup as data_setup, shards
from jaxlm.errors import UserError
from jaxlm.models import ModelConfig, Pretrainer
from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib
from jaxlm.training import checkpoints, flops, inputs, optimizer, preemption, provenance
from jaxlm.training import state as state_lib, step as step_lib
from jaxlm.training.metrics import MetricWriter


class TrainingStopped(UserError):
  """The run stopped itself (non-finite values); the last good checkpoint is kept."""


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it is writable now, not after hours of training."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise UserError(f"The workdir '{workdir}' is not writable ({e.strerror}). Choose another "
                    "--workdir or fix its permissions / free disk space.") from None


def _check_disk_space(workdir: str, abstract_state) -> None:
  """Refuses to start when the disk cannot hold two checkpoints of this state."""
  need = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract_state))
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise UserError(
        f"The workdir '{workdir}' has {free / 2**20:.0f} MiB free, but two checkpoints of this "
        f"model need about {need / 2**20:.0f} MiB. Free space or choose another --workdir."
    )


def _global_batch(host_batch, sharding, process_count):
  return {
      k: jax.make_array_from_process_local_data(
          sharding, v, (v.shape[0] * process_count,) + v.shape[1:])
      for k, v in host_batch.items()
  }


def _ratios(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
  """`name/sum` and `name/count` pairs to `prefix + name` = sum / count."""
  out = {}
  for key, value in sums.items():
    if key.endswith("/sum"):
      name = key[: -len("/sum")]
      out[prefix + name] = value / max(sums[name + "/count"], 1e-9)
  return out


class _Interval:
  """Metrics of the steps since the last log row, fetched one step late."""

  def __init__(self, saved: dict | None = None):
    self.reset()
    if saved:
      self.sums, self.steps = dict(saved["sums"]), saved["steps"]
      self.skipped, self.last = saved["skipped"], dict(saved["last"])

  def reset(self):
    self.sums: dict[str, float] = {}
    self.steps = 0
    self.skipped = 0
    self.last: dict[str, float] = {}
    self.timed_steps = 0  # Steps run in this process since `started` (for tokens/s).
    self.started = time.perf_counter()

  def to_json(self) -> dict:
    return {"sums": self.sums, "steps": self.steps, "skipped": self.skipped, "last": self.last}

  def add(self, metrics: dict[str, np.ndarray]) -> None:
    self.steps += 1
    self.timed_steps += 1
    self.skipped += int(metrics["skipped"])
    for key, value in metrics.items():
      value = float(value)
      if "/" in key:
        self.sums[key] = self.sums.get(key, 0.0) + value
      else:
        self.sums[key + "/sum"] = self.sums.get(key + "/sum", 0.0) + value
        self.sums[key + "/count"] = self.sums.get(key + "/count", 0.0) + 1.0
        self.last[key] = value


def seed_keys(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """The parameter-init and dropout keys, from `seeds.init` and `seeds.dropout` (the data seed
  goes to the loader). With both derived from train.seed they are the keys used before the
  seeds were split, so existing runs give the same numbers."""
  seeds = config_lib.resolved_seeds(config)
  return (jax.random.fold_in(jax.random.key(seeds["init"]), 0),
          jax.random.fold_in(jax.random.key(seeds["dropout"]), 1))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run described by `config` in `workdir`; returns the last row."""
  process_index, process_count = jax.process_index(), jax.process_count()
  is_main = process_index == 0
  config_lib.validate(config, process_count)
  prepare_workdir(workdir)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  t, d = config.train, config.data
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = rules_lib.rules_from_config(config.mesh)
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
  model_config = ModelConfig.from_config(config.model)

  sources, objectives, train_loader, eval_loaders = inputs.build_inputs(
      config, workdir, model_config.vocab_size, process_index, process_count)

  model = Pretrainer.for_objectives(model_config, objectives)
  tx, schedule = optimizer.make_optimizer(config.optimizer, t.steps)
  first = train_loader.batch(0)
  global_shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * process_count,) + v.shape[1:], v.dtype)
                   for k, v in first.items()}
  init_batch = {k: jax.ShapeDtypeStruct((1,) + v.shape[1:], v.dtype) for k, v in first.items()}
  batch_sharding = rules_lib.batch_sharding(mesh, rules)
  replicated = rules_lib.replicated(mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # Made under the mesh, as every array the step takes: on several processes a key made
    # outside it is process-local and cannot be placed on the global mesh.
    init_rng, dropout_rng = seed_keys(config)
    abstract, shardings = state_lib.abstract_state(model, tx, init_batch, mesh, rules)
    _check_disk_space(workdir, abstract)
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                            keep=t.keep_checkpoints)
    restored = checkpointer.restore_newest(abstract)
    position: dict = {}
    if restored is None:
      state = state_lib.init_state(init_rng, model, tx, init_batch, shardings)
      start = 0
    else:
      state, position = restored
      start = int(state.step)
      data_setup.check_fingerprint(position.get("data_fingerprint"), sources.fingerprint,
                                   d.allow_data_change)
      if position.get("global_batch_size") != d.batch_size:
        logging.warning("Resuming with data.batch_size %d, saved with %s: the data stream moves.",
                        d.batch_size, position.get("global_batch_size"))
      logging.info("Resumed from the checkpoint at step %d", start)
    if is_main:  # After the check above: a refused resume leaves the records as they were.
      previous = provenance.last_start(workdir) if restored is not None else None
      previous_steps = previous["config"]["train"]["steps"] if previous else None
      for warning in (config_lib.recipe_warnings(config)
                      + config_lib.resume_warnings(config, previous_steps)):
        logging.warning("Recipe: %s", warning)
      shards.write_json(os.path.join(workdir, data_setup.DATASET_FILE), sources.description)
      provenance.append_start(workdir, config, start_step=start,
                              data_fingerprint=sources.fingerprint)
    logging.info(
        "Parameters: %d (%.1f MiB per device); optimizer state: %.1f MiB per device; mesh %s",
        sum(x.size for x in jax.tree_util.tree_leaves(abstract.params)),
        state_lib.bytes_per_device(state.params) / 2**20,
        state_lib.bytes_per_device(state.opt_state) / 2**20, dict(mesh.shape))

    train_fn = jax.jit(
        functools.partial(step_lib.train_step, model=model, objectives=objectives, tx=tx,
                          schedule=schedule, microbatches=t.microbatches),
        in_shardings=(shardings, batch_sharding, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    # Each eval set runs only the heads of the objectives it evaluates (the pairs set, no MLM).
    eval_fns = {
        name: jax.jit(
            functools.partial(
                step_lib.eval_step, objectives=chosen,
                model=model.clone(heads=tuple(
                    (n, h) for n, h in model.heads if n in {o.name for o in chosen}))),
            in_shardings=(shardings.params, batch_sharding),
            out_shardings=replicated,
        )
        for name, (chosen, _) in eval_loaders.items()
    }
    dropout_rng = jax.device_put(dropout_rng, replicated)
    compile_start = time.perf_counter()
    train_compiled = train_fn.lower(abstract, global_shapes, dropout_rng).compile()
    logging.info("Train step compiled in %.1f s", time.perf_counter() - compile_start)

    tokens_per_step = d.batch_size * d.seq_len
    flops_per_token = flops.training_flops_per_token(model_config, d.seq_len, objectives)
    peak = flops.peak_flops_per_device(t.peak_tflops_per_device) * jax.device_count()

    eval_batches: dict[str, list] = {}  # The fixed sets, built once (this host's rows).

    def evaluate(params) -> dict[str, float]:
      """Every objective on its fixed eval set; eval/loss is their weighted sum."""
      sums: dict[str, float] = {}
      for name, (_, eval_loader) in eval_loaders.items():
        if name not in eval_batches:
          eval_batches[name] = [eval_loader.batch(k) for k in range(eval_loader.steps)]
        for host_batch in eval_batches[name]:
          batch = _global_batch(host_batch, batch_sharding, process_count)
          for key, value in jax.device_get(eval_fns[name](params, batch)).items():
            if not key.startswith("loss/"):
              sums[key] = sums.get(key, 0.0) + float(value)
      row = _ratios(sums, "eval/")
      row["eval/loss"] = sum(o.weight * row[f"eval/{o.name}_loss"] for o in objectives)
      for o in objectives:
        if o.perplexity:  # Of the token-weighted mean loss over the whole fixed set.
          row[f"eval/{o.name}_perplexity"] = math.exp(min(row[f"eval/{o.name}_loss"], 700.0))
      return {"eval/loss": row.pop("eval/loss"), **row}

    stop = preemption.StopRequest(checkpointer.reached_preemption, process_count > 1)
    writer = MetricWriter(workdir, resume_step=start, enabled=is_main)
    # The partial log interval and skip count travel with the checkpoint, so the rows of a
    # resumed run equal those of an uninterrupted one.
    interval = _Interval(position.get("interval"))
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
      for step, host_batch in train_loader.iterate(start, t.steps, workers=d.workers):
        batch = _global_batch(host_batch, batch_sharding, process_count)
        state, metrics = train_compiled(state, batch, dropout_rng)
        if pending is not None:
          consecutive_skips = _account(interval, pending, consecutive_skips, t, checkpointer)
        pending = metrics
        done = step + 1
        progress.update(1)
        if done == 1 or done % t.log_every == 0 or done == t.steps:
          consecutive_skips = _account(interval, pending, consecutive_skips, t, checkpointer)
          pending = None
          elapsed = time.perf_counter() - interval.started
          tokens_per_sec = interval.timed_steps * tokens_per_step / max(elapsed, 1e-9)
          row = _ratios(interval.sums)
          row.update(
              learning_rate=interval.last["learning_rate"],
              tokens_per_sec=tokens_per_sec,
              mfu=flops_per_token * tokens_per_sec / peak if peak else 0.0,
              skipped_steps=interval.skipped,
          )
          row.pop("skipped", None)
          for name in token_objectives:
            count = interval.sums.get(f"{name}_loss/count", 0.0)
            predicted_tokens += count
            row[f"{name}_predicted_per_step"] = count / max(interval.steps, 1)
          row.update(tokens_seen=done * tokens_per_step, predicted_tokens=predicted_tokens,
                     model_flops=done * tokens_per_step * flops_per_token)
          writer.write(done, row)
          last_row = row
          progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
          if not interactive:  # A log line instead of a bar when stderr is a file.
            logging.info("step %d/%d: loss %.4f, %s tokens/s", done, t.steps, row["loss"],
                         f"{tokens_per_sec:,.0f}")
          interval.reset()
        if done % t.eval_every == 0 or done == t.steps:
          eval_started = time.perf_counter()
          eval_row = evaluate(state.params)
          writer.write(done, {**eval_row, "tokens_seen": done * tokens_per_step,
                              "model_flops": done * tokens_per_step * flops_per_token})
          last_row = {**last_row, **eval_row}
          logging.info("step %d: %s", done, json.dumps({k: round(v, 4) for k, v in eval_row.items()}))
          interval.started += time.perf_counter() - eval_started  # Not training time.
        stopping = stop.should_stop(done)
        if done % t.checkpoint_every == 0 or done == t.steps or stopping:
          if pending is not None:
            consecutive_skips = _account(interval, pending, consecutive_skips, t, checkpointer)
            pending = None
          stalled = checkpointer.save(done, state, {
              "step": done, "global_batch_size": d.batch_size, "interval": interval.to_json(),
              "data_fingerprint": sources.fingerprint,
              "consecutive_skips": consecutive_skips, "predicted_tokens": predicted_tokens})
          logging.info("Checkpoint of step %d started; the loop waited %.2f s", done, stalled)
        if stopping:
          logging.warning("Stopped at step %d on request; the checkpoint holds it. Run the "
                          "same command to continue.", done)
          break
      checkpointer.wait()
    finally:
      stop.restore()
      progress.close()
      writer.close()
      checkpointer.close()
  return last_row


def _account(interval: _Interval, metrics, consecutive_skips: int, t, checkpointer) -> int:
  """Adds one step's fetched metrics; stops the run after too many non-finite steps in a row."""
  host = jax.device_get(metrics)
  interval.add(host)
  consecutive_skips = consecutive_skips + 1 if int(host["skipped"]) else 0
  loss = float(host["loss"])
  if np.isfinite(loss) and loss > t.divergence_loss:
    steps = checkpointer.steps()
    raise TrainingStopped(
        f"Training stopped: the loss reached {loss:.4g}, past train.divergence_loss "
        f"({t.divergence_loss:g}); the run has diverged. Lower optimizer.learning_rate (or "
        f"raise optimizer.warmup_steps). The last good checkpoint "
        f"({'step ' + str(steps[-1]) if steps else 'none yet'}) is left intact."
    )
  if consecutive_skips >= t.max_consecutive_skips:
    steps = checkpointer.steps()
    raise TrainingStopped(
        f"Training stopped: the loss or gradients were non-finite (NaN/inf) for "
        f"{consecutive_skips} consecutive steps; those updates were skipped. The learning rate "
        f"(optimizer.learning_rate) is probably too high. The last good checkpoint "
        f"({'step ' + str(steps[-1]) if steps else 'none yet'}) is left intact."
    )
  return consecutive_skips
