"""Throughput measurements behind `python -m jaxlm.bench` and `benchmarks/compare_hf.py`: the
host input pipeline alone, and the trainer's own jitted step on synthetic batches.

A library module (no absl flags), so tests and other tools import it without the entry point's
flag definitions.
"""

import copy
import math
import os
import time

import numpy as np

from jaxlm import huge_pages



def pipeline_benchmark(config, workdir: str, steps: int, warmup: int) -> dict:
  """Times `steps` batches of the run's training pipeline; returns the figures."""
  from jaxlm import config as config_lib
  from jaxlm.training import inputs, loop

  config_lib.validate(config)
  # The full batch's pipeline, as the figures below count it: a batch-size ramp's first steps
  # would be smaller.
  config = copy.deepcopy(config)
  config.train.update(batch_ramp_steps=0, batch_ramp_start=0)
  loop.prepare_workdir(workdir)
  sources, objectives, train, _ = inputs.build_inputs(config, workdir, config.model.vocab_size)
  d = config.data
  batches = train.iterate(0, warmup + steps, workers=d.workers)  # As the training loop does.
  started = time.perf_counter()
  for step, _ in batches:
    if step == warmup - 1:  # Warm-up done (workers started, pages of the shards read once).
      started = time.perf_counter()
  seconds = time.perf_counter() - started
  timed = steps
  tokens = timed * d.batch_size * d.seq_len
  return dict(
      tokens_per_sec=round(tokens / seconds),
      batches_per_sec=round(timed / seconds, 1),
      ms_per_batch=round(1e3 * seconds / timed, 3),
      workers=d.workers, format=d.format, objectives=[o.name for o in objectives],
      batch_size=d.batch_size, seq_len=d.seq_len, steps=timed, data=sources.fingerprint,
      train_tokens=sources.train.num_tokens)


BENCH_STREAM = 7  # Synthetic batches' random stream (the loader's train / eval are 0 / 1).
DISTINCT_BATCHES = 4  # Synthetic batches made, then cycled (their contents do not change costs).


def synthetic_rows(config, objectives, step: int, rows: int, first_row: int = 0) -> dict:
  """Host rows of the configured shape as a run's loader makes them, from random token ids:
  `pairs`: [CLS] A [SEP] B [SEP] with random NSP labels (`data.pack_examples` of them side by
  side, as packed rows), other formats a full window of text; then every objective's host
  transform, keyed as the loader keys them."""
  from jaxlm.data import formats, random as random_lib, tokenizer as tokenizer_lib

  d = config.data
  g = first_row + np.arange(rows) + step * d.batch_size  # Global row numbers, as the loader's.
  keys = random_lib.row_keys(d.eval_seed, BENCH_STREAM, g)
  rng = np.random.default_rng(random_lib.row_keys(d.eval_seed, BENCH_STREAM, step) % 2**63)
  ids = rng.integers(tokenizer_lib.NUM_SPECIAL, config.model.vocab_size, (rows, d.seq_len),
                     dtype=np.int32)
  types = np.zeros_like(ids)
  batch = {"input_ids": ids, "token_type_ids": types}
  # Packed pairs (data.pack_examples): that many equal examples per row, kept apart as a run's.
  per_row = d.pack_examples if d.format == "pairs" else 1
  if d.format == "pairs":
    width = d.seq_len // per_row
    slot = np.minimum(np.arange(d.seq_len) // width, per_row - 1)
    within = np.arange(d.seq_len) - slot * width
    last = np.where(slot == per_row - 1, d.seq_len - 1 - slot * width, width - 1)
    ids[:, within == 0] = tokenizer_lib.CLS_ID
    middle = (last + 1) // 2
    ids[:, (within == middle) | (within == last)] = tokenizer_lib.SEP_ID
    types[:, within > middle] = 1
    if per_row > 1:
      batch.update(example_ids=np.broadcast_to(slot + 1, ids.shape).astype(np.int32),
                   position_ids=np.broadcast_to(within, ids.shape).astype(np.int32),
                   cls_positions=np.broadcast_to(np.arange(per_row) * width,
                                                 (rows, per_row)).astype(np.int32))
  else:
    ids[:, -1] = tokenizer_lib.SEP_ID
  for key in formats.FORMATS[d.format].extra_fields:  # NSP labels: half random next.
    labels = random_lib.uniform(keys, 0, (per_row,)) < 0.5
    batch[key] = (labels[:, 0] if per_row == 1 else labels).astype(np.int32)
  for objective in objectives:
    batch = objective.host_transform(
        batch, random_lib.row_keys(d.eval_seed, BENCH_STREAM, g, random_lib.salt(objective.name)))
  return batch


def peak_memory() -> tuple[int, str]:
  """Peak memory of the first local device from `memory_stats()`; on a host without them (CPU),
  the process's peak resident set size."""
  import resource

  import jax

  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("peak_bytes_in_use"):
    return int(stats["peak_bytes_in_use"]), f"{device.device_kind} memory_stats peak_bytes_in_use"
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "process peak RSS (getrusage ru_maxrss): host memory of the whole process")


def matmuls_of(jaxpr) -> list[tuple[tuple, tuple, object]]:
  """Every `dot_general` a jaxpr runs, as (operand shapes, operand dtypes, dimension numbers),
  looking inside nested jaxprs; a scan's body counts once per iteration."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append((tuple(v.aval.shape for v in eqn.invars),
                    tuple(v.aval.dtype for v in eqn.invars), eqn.params["dimension_numbers"]))
    repeat = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for inner in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(inner, "jaxpr", inner)  # A ClosedJaxpr's jaxpr.
        if hasattr(inner, "eqns"):
          found += matmuls_of(inner) * repeat
  return found


def matmul_flops(matmul) -> float:
  """2 x batch x contracted x free(lhs) x free(rhs) of one `matmuls_of` entry."""
  (lhs, rhs), _, ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)) = matmul
  size = lambda shape, dims: math.prod(shape[i] for i in dims)
  free = lambda shape, used: math.prod(d for i, d in enumerate(shape) if i not in used)
  return 2.0 * size(lhs, lhs_batch) * size(lhs, lhs_contract) * free(
      lhs, set(lhs_contract) | set(lhs_batch)) * free(rhs, set(rhs_contract) | set(rhs_batch))


def time_matmuls_alone(matmuls, repeats: int = 10) -> float:
  """Median seconds of one jitted function that runs exactly these matmuls (on random operands,
  independent of each other): the step with everything but its matrix products taken away."""
  import statistics

  import jax

  keys = jax.random.split(jax.random.key(0), 2 * len(matmuls))
  operands = [tuple(jax.random.normal(keys[2 * i + j], shape, dtype)
                    for j, (shape, dtype) in enumerate(zip(shapes, dtypes)))
              for i, (shapes, dtypes, _) in enumerate(matmuls)]
  numbers = [dn for _, _, dn in matmuls]
  run = jax.jit(lambda ops: [jax.lax.dot_general(a, b, dn) for (a, b), dn in zip(ops, numbers)])
  for _ in range(2):
    jax.block_until_ready(run(operands))
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(run(operands))
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def step_benchmark(config, steps: int, warmup: int, matmul_size: int | None = None,
                   ceiling: bool = False) -> dict:
  """Times the run's jitted train step on synthetic batches; returns the figures.
  `matmul_size`: of the CPU peak's matmul (default `flops.MATMUL_SIZE`; tests use less).
  `ceiling`: also time the step's own matrix products alone (`time_matmuls_alone`): the MFU
  the step would reach if everything else cost nothing, with these matmul kernels."""
  import functools
  import statistics

  import flax.linen as nn
  import jax

  from jaxlm import config as config_lib
  from jaxlm.models import ModelConfig, Pretrainer
  from jaxlm.objectives import DataSpec, build_objectives
  from jaxlm.parallel import rules as rules_lib
  from jaxlm.training import evaluation, flops, optimizer, trainer
  from jaxlm.training import state as state_lib, step as step_lib

  config_lib.validate(config, jax.process_count())
  t, d = config.train, config.data
  model_config = ModelConfig.from_config(config.model)
  # Every piece starts a word: whole-word masking then picks as many positions as piece masking.
  spec = DataSpec(vocab_size=model_config.vocab_size, seq_len=d.seq_len,
                  word_start=np.ones(model_config.vocab_size, bool))
  objectives = build_objectives(config.objectives, spec, config.eval)
  model = Pretrainer.for_objectives(model_config, objectives)
  process_count = jax.process_count()
  mesh = trainer.make_mesh(config, process_count)
  rules = rules_lib.rules_from_config(config.mesh)
  tx, schedule = optimizer.make_optimizer(config.optimizer, t.steps)
  rows = d.batch_size // process_count
  host_batches = [synthetic_rows(config, objectives, i, rows, jax.process_index() * rows)
                  for i in range(min(DISTINCT_BATCHES, warmup + steps))]
  first = host_batches[0]
  global_shapes, init_batch = evaluation.batch_shapes(first, process_count)
  batch_sharding = rules_lib.batch_sharding(mesh, rules)
  replicated = rules_lib.replicated(mesh)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    matmul_size = matmul_size or flops.MATMUL_SIZE
    peak_before, peak_source = flops.peak_flops(t.peak_tflops_per_device, measure=True,
                                                matmul_size=matmul_size)
    init_rng, dropout_rng = trainer.seed_keys(config)
    abstract, shardings = state_lib.abstract_state(model, tx, init_batch, mesh, rules)
    state = state_lib.init_state(init_rng, model, tx, init_batch, shardings)
    train_fn = jax.jit(  # As trainer.fit jits it.
        functools.partial(step_lib.train_step, model=model, objectives=objectives, tx=tx,
                          schedule=schedule, microbatches=t.microbatches, merge=None),
        in_shardings=(shardings, batch_sharding, replicated, None),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    dropout_rng = jax.device_put(dropout_rng, replicated)
    compile_start = time.perf_counter()
    compiled = train_fn.lower(abstract, global_shapes, dropout_rng, None).compile()
    compile_s = time.perf_counter() - compile_start
    batches = [evaluation.global_batch(b, batch_sharding, process_count) for b in host_batches]

    times, counts = [], []
    for i in range(warmup + steps):
      batch = batches[i % len(batches)]
      started = time.perf_counter()
      state, metrics = compiled(state, batch, dropout_rng, None)
      jax.block_until_ready((state, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - started)
        counts.append({k: float(v) for k, v in metrics.items() if k.endswith("_loss/count")})
    matmuls = None
    if ceiling:
      matmuls = matmuls_of(jax.make_jaxpr(train_fn)(abstract, global_shapes, dropout_rng,
                                                    None).jaxpr)
      matmuls_s = time_matmuls_alone(matmuls)
    peak_after, _ = flops.peak_flops(t.peak_tflops_per_device, measure=True,
                                     matmul_size=matmul_size)

  step_s = statistics.median(times)
  tokens_per_step = d.batch_size * d.seq_len
  tokens_per_sec = tokens_per_step / step_s
  # Predictions per sequence the batches really had (the step's own counts, as the loop's).
  predictions = {o.name: statistics.fmean(c[f"{o.name}_loss/count"] for c in counts) / d.batch_size
                 for o in objectives if o.perplexity}
  model_flops = flops.training_flops_per_token(model_config, d.seq_len, objectives, predictions,
                                               rows_per_step=d.batch_size)
  peak = max(peak_before, peak_after)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  memory, memory_source = peak_memory()
  device = jax.local_devices()[0]
  extra = {}
  if matmuls is not None:
    flops_of_matmuls = sum(matmul_flops(m) for m in matmuls)
    extra = dict(
        matmuls_per_step=len(matmuls), matmul_flops_per_step=flops_of_matmuls,
        matmuls_alone_ms=round(1e3 * matmuls_s, 2),
        matmul_flops_per_sec=flops_of_matmuls / matmuls_s,
        # The MFU of a step that were only its matmuls, on the same peak.
        mfu_ceiling=round(model_flops * tokens_per_step / matmuls_s / peak, 4) if peak else 0.0)
  return dict(
      tokens_per_sec=round(tokens_per_sec, 1),
      step_ms=round(1e3 * step_s, 2),
      step_ms_min_max=[round(1e3 * min(times), 2), round(1e3 * max(times), 2)],
      model_flops_per_token=model_flops,
      # XLA's own count of the compiled step (one device's program): also softmax, norms,
      # optimizer and padded prediction slots, so above the model FLOPs.
      xla_flops_per_token=(float(cost["flops"]) / tokens_per_step
                           if cost and jax.device_count() == 1 else None),
      mfu=round(model_flops * tokens_per_sec / peak, 4) if peak else 0.0,
      peak_flops=peak,
      peak_flops_before_after=[peak_before, peak_after],
      peak_source=peak_source,
      compile_s=round(compile_s, 2),
      peak_memory_bytes=memory,
      peak_memory_source=memory_source,
      predictions_per_seq={k: round(v, 3) for k, v in predictions.items()},
      objectives=[o.name for o in objectives], batch_size=d.batch_size, seq_len=d.seq_len,
      microbatches=t.microbatches, dropout=model_config.dropout_rate,
      attention_dropout=model_config.attention_dropout_rate,
      attention_impl=model_config.attention_impl, prng_impl=t.prng_impl,
      steps=steps, warmup=warmup, devices=jax.device_count(), device_kind=device.device_kind,
      xla_flags=os.environ.get("XLA_FLAGS", ""), load_average=list(os.getloadavg()),
      malloc_huge_pages=huge_pages.enabled_in_this_process(), **extra)
