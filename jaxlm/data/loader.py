"""The deterministic, resumable, host-sharded input pipeline over a prepared split.

Example `g` of a run (g = step x global batch + row; with a batch-size ramp, g = offset(step) +
row, offset being the rows of all earlier steps: `batch_schedule.py`) is example `perm_e(g % N)`
of the format, where `e = g // N` is its epoch, N the examples in one pass, and `perm_e` a
lazily evaluated pseudo-random permutation keyed by (seed, epoch): no epoch is ever built.
Every random choice for row g (the format's pairs and NSP draws, each transform's masks) comes
from counter-based keys of (seed, stream, g), so a resumed run, or a run on another number of
hosts, sees exactly the same batches; the checkpoint needs only the step. Each host computes
only its rows.

The eval set is fixed: example k < `num_examples` is example `perm(k)` under the eval seed, its
masks keyed by k; the last batch is filled with padding rows that objectives weigh 0.

This module knows no objective: the training loop hands it named transforms.
"""

import multiprocessing
import queue
import threading
import traceback
from multiprocessing import shared_memory
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxlm.data import random as random_lib
from jaxlm.data.batch_schedule import BatchSchedule
from jaxlm.data.formats import Format
from jaxlm.errors import UserError

Batch = dict[str, np.ndarray]
# A host-side transform: (batch, one uint64 key per example) -> batch.
Transform = Callable[[Batch, np.ndarray], Batch]

TRAIN_STREAM, EVAL_STREAM = 0, 1


class BatchLoader:
  """Batches of one process's rows, as numpy, for a given step."""

  def __init__(
      self,
      fmt: Format,
      *,
      global_batch_size: int,
      transforms: Sequence[tuple[str, Transform]],
      seed: int,
      stream_id: int = TRAIN_STREAM,
      process_index: int = 0,
      process_count: int = 1,
      num_examples: int | None = None,
      shuffle: bool = True,
      schedule: BatchSchedule | None = None,
  ):
    """`num_examples` makes a fixed set (eval): that many examples, then padding, no epochs.
    `shuffle=False` takes the examples in their order (a labelled eval file, line by line).
    `schedule`: a training stream whose global batch varies by step (a ramp); None keeps
    `global_batch_size` throughout."""
    if global_batch_size % process_count:
      raise ValueError(f"batch {global_batch_size} does not split over {process_count} hosts")
    if schedule is not None and (
        num_examples is not None or schedule.batch_size != global_batch_size
        or (schedule.ramp_steps and schedule.ramp_start % process_count)):
      raise ValueError(f"schedule {schedule} does not fit a stream of {global_batch_size} "
                       f"over {process_count} hosts (or a fixed set)")
    self.format = fmt
    self._batch = global_batch_size
    self._transforms = [(name, random_lib.salt(name), fn) for name, fn in transforms]
    self._seed, self._stream_id = seed, stream_id
    self.epoch_size = len(fmt)
    self.num_examples = None if num_examples is None else min(num_examples, self.epoch_size)
    per_process = global_batch_size // process_count
    self._rows = np.arange(per_process * process_index, per_process * (process_index + 1))
    self._process_index, self._process_count = process_index, process_count
    self.schedule = schedule
    self._permutations: dict[int, random_lib.IndexPermutation] = {}
    self._shuffle = shuffle

  @property
  def steps(self) -> int | None:
    """Batches in the fixed set (None for an endless training stream)."""
    return None if self.num_examples is None else -(-self.num_examples // self._batch)

  def _permutation(self, epoch: int) -> random_lib.IndexPermutation:
    if epoch not in self._permutations:
      if len(self._permutations) > 4:
        self._permutations.clear()
      self._permutations[epoch] = random_lib.IndexPermutation(
          self.epoch_size, int(random_lib.row_keys(self._seed, self._stream_id, epoch)))
    return self._permutations[epoch]

  def example_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Global example numbers of this process's rows, and their examples in the format."""
    if self.schedule is None:
      g = step * self._batch + self._rows
    else:  # This process's block of the step's global batch, as without a ramp.
      per_process = self.schedule.size(step) // self._process_count
      g = (self.schedule.offset(step) + per_process * self._process_index
           + np.arange(per_process, dtype=np.int64))
    if not self._shuffle:
      return g, g % self.epoch_size
    epochs = g // self.epoch_size
    examples = np.empty_like(g)
    for epoch in np.unique(epochs):
      hit = epochs == epoch
      examples[hit] = self._permutation(int(epoch))(g[hit] % self.epoch_size)
    return g, examples

  def batch(self, step: int) -> Batch:
    """This process's rows of the global batch of `step`."""
    g, examples = self.example_indices(step)
    real = np.ones(len(g), bool) if self.num_examples is None else g < self.num_examples
    batch = self.format.examples(
        examples[real], random_lib.row_keys(self._seed, self._stream_id, g[real]))
    if not real.all():
      filler = self.format.padding(int((~real).sum()))
      batch = {k: np.concatenate([batch[k], filler[k]]) for k in batch}
    for _, salt, transform in self._transforms:
      batch = transform(batch, random_lib.row_keys(self._seed, self._stream_id, g, salt))
    return batch

  def iterate(self, start_step: int, stop_step: int, prefetch: int = 2,
              workers: int = 0) -> Iterator[tuple[int, Batch]]:
    """Yields `(step, batch)` from `start_step`, built ahead: in a background thread, or with
    `workers` > 0 in that many processes (step s by worker s mod workers), in step order."""
    if workers > 0:
      return _from_processes(self, start_step, stop_step, workers, max(prefetch, 1))
    batches = ((s, self.batch(s)) for s in range(start_step, stop_step))
    return _prefetch(batches, prefetch) if prefetch else batches


def _work(loader: BatchLoader, first: int, stop: int, every: int, ready, free, stopping) -> None:
  """A worker process: builds the batches of steps first, first + every, ... into shared memory.

  Batches travel through shared-memory slots (the queue carries only their layout): pickling a
  256 x 128 batch through a pipe costs about 1.5 ms here, a third of building it.
  """
  slots: list[shared_memory.SharedMemory] = []
  try:
    for step in range(first, stop, every):
      batch = loader.batch(step)
      size = sum(v.nbytes for v in batch.values())
      slot = None
      while slot is None and not stopping.is_set():
        try:
          slot = free.get(timeout=0.1)
        except queue.Empty:
          continue
      if stopping.is_set():
        return
      if slot >= len(slots):
        slots.append(shared_memory.SharedMemory(create=True, size=size))
      elif slots[slot].size < size:  # A larger batch than before: a new block for this slot.
        slots[slot].close()
        slots[slot].unlink()
        slots[slot] = shared_memory.SharedMemory(create=True, size=size)
      memory, layout, offset = slots[slot], [], 0
      for key, value in batch.items():
        np.ndarray(value.shape, value.dtype, memory.buf, offset)[...] = value
        layout.append((key, value.shape, value.dtype.str, offset))
        offset += value.nbytes
      ready.put((step, memory.name, slot, layout))
    stopping.wait()  # Keep the slots alive until the consumer has copied the last batch.
  except UserError as e:  # A user's mistake stays one, without a traceback.
    ready.put((-2, str(e), -1, None))
    stopping.wait()
  except BaseException:  # Re-raised in the consumer, with the worker's traceback as text.
    ready.put((-1, traceback.format_exc(), -1, None))
    stopping.wait()
  finally:
    for memory in slots:
      memory.close()
      memory.unlink()


def _from_processes(loader: BatchLoader, start: int, stop: int, workers: int,
                    depth: int) -> Iterator[tuple[int, Batch]]:
  """Batches from `workers` spawned processes (never forked: the parent may run JAX)."""
  context = multiprocessing.get_context("spawn")
  stopping = context.Event()
  ready = [context.Queue() for _ in range(workers)]
  free = [context.Queue() for _ in range(workers)]
  for k in range(workers):
    for slot in range(depth):
      free[k].put(slot)
  processes = [context.Process(target=_work, daemon=True, args=(
      loader, start + k, stop, workers, ready[k], free[k], stopping)) for k in range(workers)]
  for process in processes:
    process.start()
  # (worker, slot) -> the block it is in now; a worker replaces a slot's block by a larger one
  # when the batch grows (a batch-size ramp), and the old one is closed here then.
  attached: dict[tuple[int, int], shared_memory.SharedMemory] = {}
  try:
    for step in range(start, stop):
      k = (step - start) % workers
      while True:
        try:
          got, name, slot, layout = ready[k].get(timeout=1.0)
          break
        except queue.Empty:
          if not processes[k].is_alive():
            raise RuntimeError(
                f"The data worker for step {step} died (exit code {processes[k].exitcode}): out "
                "of memory, or of shared memory (/dev/shm, where batches travel; in Docker raise "
                "--shm-size). data.workers=0 builds batches in a thread instead.") from None
      if got == -2:
        raise UserError(name)
      if got < 0:
        raise RuntimeError(f"A data worker failed:\n{name}")
      memory = attached.get((k, slot))
      if memory is None or memory.name.lstrip("/") != name.lstrip("/"):
        if memory is not None:
          memory.close()
        memory = attached[k, slot] = shared_memory.SharedMemory(name=name)
      buf = memory.buf
      batch = {key: np.ndarray(shape, np.dtype(dtype), buf, offset).copy()
               for key, shape, dtype, offset in layout}
      free[k].put(slot)
      yield step, batch
  finally:
    for memory in attached.values():
      memory.close()
    stopping.set()
    for process in processes:
      process.join(timeout=5)
      if process.is_alive():
        process.terminate()


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
  """Runs `items` in a thread `depth` ahead; an exception there is raised here."""
  buffer: queue.Queue = queue.Queue(maxsize=depth)
  done = object()
  stop = threading.Event()

  def put(item) -> bool:
    """Waits for room unless the consumer has gone; False when it has."""
    while not stop.is_set():
      try:
        buffer.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
      put(done)
    except BaseException as e:  # Re-raised in the consumer.
      put(e)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = buffer.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
