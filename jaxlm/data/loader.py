"""The deterministic, resumable, host-sharded input pipeline.

What a step sees is a pure function of (config, step): example `g` of the run is example
`g % epoch_size` of epoch `g // epoch_size`, and each epoch's examples are built afresh (new
pairs, new random-next segments) from a seed derived from (seed, epoch). Host-side corruption
(masking, permutations) is applied per example with a Generator seeded by
(seed, stream, step, index in the global batch, transform name). So a resumed run, or a run on
another number of hosts, sees exactly the same batches; the checkpoint needs only the step.

This module knows no objective: the training loop hands it named transforms.
"""

import queue
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxlm.data.examples import Examples, TokenDocument, build_pairs

Batch = dict[str, np.ndarray]
# A host-side transform: (batch, one Generator per example) -> batch.
Transform = Callable[[Batch, Sequence[np.random.Generator]], Batch]

TRAIN_STREAM, EVAL_STREAM = 0, 1


class ExampleStream:
  """An endless sequence of BERT examples: epoch after epoch over the documents."""

  def __init__(
      self,
      documents: list[TokenDocument],
      *,
      seq_len: int,
      short_seq_prob: float,
      random_next_prob: float,
      seed: int,
      stream_id: int = TRAIN_STREAM,
  ):
    self._documents = documents
    self._options = dict(
        seq_len=seq_len, short_seq_prob=short_seq_prob, random_next_prob=random_next_prob
    )
    self._seed = seed
    self._stream_id = stream_id
    self._cache: dict[int, Examples] = {}
    # Epochs differ a little in length; all are cut or wrapped to the first one's size so that
    # the epoch of example g is g // epoch_size without building the epochs before it.
    self.epoch_size = len(self._build(0))

  def _build(self, epoch: int) -> Examples:
    if epoch not in self._cache:
      rng = np.random.default_rng([self._seed, self._stream_id, epoch])
      examples = build_pairs(self._documents, rng=rng, **self._options)
      if len(self._cache) >= 2:
        self._cache.pop(min(self._cache))
      self._cache[epoch] = examples
    return self._cache[epoch]

  def take(self, indices: np.ndarray) -> Examples:
    """Examples at global indices (which may span an epoch boundary), in order."""
    epochs = indices // self.epoch_size
    parts = []
    for epoch in np.unique(epochs):
      examples = self._build(int(epoch))
      within = indices[epochs == epoch] % self.epoch_size
      parts.append(examples.take(within % len(examples)))
    if len(parts) == 1:
      return parts[0]
    return Examples(*(np.concatenate(x) for x in zip(*(vars(p).values() for p in parts))))


class BatchLoader:
  """Batches of one process's rows, as numpy, for a given step."""

  def __init__(
      self,
      stream: ExampleStream,
      *,
      global_batch_size: int,
      transforms: Sequence[tuple[str, Transform]],
      seed: int,
      stream_id: int = TRAIN_STREAM,
      process_index: int = 0,
      process_count: int = 1,
  ):
    if global_batch_size % process_count:
      raise ValueError(f"batch {global_batch_size} does not split over {process_count} hosts")
    self._stream = stream
    self._batch = global_batch_size
    self._transforms = [(name, zlib.crc32(name.encode()), fn) for name, fn in transforms]
    self._seed = seed
    self._stream_id = stream_id
    per_process = global_batch_size // process_count
    self._rows = np.arange(per_process * process_index, per_process * (process_index + 1))

  @property
  def epoch_size(self) -> int:
    return self._stream.epoch_size

  def batch(self, step: int) -> Batch:
    """This process's rows of the global batch of `step`."""
    examples = self._stream.take(step * self._batch + self._rows)
    batch: Batch = {
        "input_ids": examples.input_ids,
        "token_type_ids": examples.token_type_ids,
        "next_sentence_label": examples.next_sentence_label,
    }
    for _, salt, transform in self._transforms:
      rngs = [
          np.random.default_rng([self._seed, self._stream_id, step, int(row), salt])
          for row in self._rows
      ]
      batch = transform(batch, rngs)
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


def tokenize_documents(
    documents: Sequence[Sequence[str]], encode_batch: Callable[[list[str]], list[list[int]]],
    split: Callable[[str], list[str]],
) -> list[TokenDocument]:
  """Splits each paragraph into sentences and encodes them, dropping empty segments."""
  flat, owners = [], []
  for d, document in enumerate(documents):
    for paragraph in document:
      for sentence in split(paragraph):
        flat.append(sentence)
        owners.append(d)
  encoded = encode_batch(flat)
  out: list[TokenDocument] = [[] for _ in documents]
  for d, ids in zip(owners, encoded):
    if ids:
      out[d].append(np.asarray(ids, np.int32))
  return [d for d in out if d]
