"""The deterministic, resumable, host-sharded input pipeline over a prepared split.

Example `g` of a run (g = step x global batch + row) is example `perm_e(g % N)` of the format,
where `e = g // N` is its epoch, N the examples in one pass, and `perm_e` a lazily evaluated
pseudo-random permutation keyed by (seed, epoch): no epoch is ever built. Every random choice for
row g (the format's pairs and NSP draws, each transform's masks) comes from counter-based keys
of (seed, stream, g), so a resumed run, or a run on another number of hosts, sees exactly the
same batches; the checkpoint needs only the step. Each host computes only its rows.

The eval set is fixed: example k < `num_examples` is example `perm(k)` under the eval seed, its
masks keyed by k; the last batch is filled with padding rows that objectives weigh 0.

This module knows no objective: the training loop hands it named transforms.
"""

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxlm.data import random as random_lib
from jaxlm.data.formats import Format

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
  ):
    """`num_examples` makes a fixed set (eval): that many examples, then padding, no epochs."""
    if global_batch_size % process_count:
      raise ValueError(f"batch {global_batch_size} does not split over {process_count} hosts")
    self.format = fmt
    self._batch = global_batch_size
    self._transforms = [(name, random_lib.salt(name), fn) for name, fn in transforms]
    self._seed, self._stream_id = seed, stream_id
    self.epoch_size = len(fmt)
    self.num_examples = None if num_examples is None else min(num_examples, self.epoch_size)
    per_process = global_batch_size // process_count
    self._rows = np.arange(per_process * process_index, per_process * (process_index + 1))
    self._permutations: dict[int, random_lib.IndexPermutation] = {}

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
    g = step * self._batch + self._rows
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
    batch = self.format.examples(examples[real], random_lib.row_keys(self._seed, self._stream_id, g[real]))
    if not real.all():
      filler = self.format.padding(int((~real).sum()))
      batch = {k: np.concatenate([batch[k], filler[k]]) for k in batch}
    for _, salt, transform in self._transforms:
      batch = transform(batch, random_lib.row_keys(self._seed, self._stream_id, g, salt))
    return batch

  def iterate(self, start_step: int, stop_step: int, prefetch: int = 2) -> Iterator[tuple[int, Batch]]:
    """Yields `(step, batch)` from `start_step`, built ahead in a background thread."""
    batches = ((s, self.batch(s)) for s in range(start_step, stop_step))
    return _prefetch(batches, prefetch) if prefetch else batches


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
  """Runs `items` in a thread `depth` ahead; an exception there is raised here."""
  buffer: queue.Queue = queue.Queue(maxsize=depth)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for item in items:
        while not stop.is_set():
          try:
            buffer.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      buffer.put(done)
    except BaseException as e:  # Re-raised in the consumer.
      buffer.put(e)

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
