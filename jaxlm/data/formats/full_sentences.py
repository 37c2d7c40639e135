"""`full_sentences`, as in RoBERTa: `[CLS]` + contiguous sentences + `[SEP]`, across documents.

The stream of documents (each ended by `[SEP]`) is tiled by windows of at most `seq_len - 2`
positions that start at a sentence wherever one lies in their slack (`base.slack_of`); a
sentence longer than the window is cut across windows. No NSP.
"""

import numpy as np

from jaxlm.data.formats import base, stream
from jaxlm.data.tokenizer import CLS_ID, SEP_ID


@base.register
class FullSentences(stream.StreamFormat):
  name = "full_sentences"

  def __init__(self, split, seq_len):
    super().__init__(split, seq_len)
    self._width = seq_len - 2
    self._count = int(base.windows_for(self._stream.length, self._width))

  def __len__(self) -> int:
    return self._count

  def window(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of windows `indices` in stream positions."""
    indices = np.asarray(indices, np.int64)
    edges = [self._start(indices), self._start(indices + 1)]
    return edges[0], edges[1] - edges[0]

  def _start(self, index: np.ndarray) -> np.ndarray:
    nominal = base.window_starts(self._count, self._stream.length, index)
    inner = (index > 0) & (index < self._count)
    lowest = nominal - base.slack_of(self._width)
    snapped = self._stream.sentence_start_before(np.minimum(nominal, self._stream.length - 1),
                                                 lowest)
    return np.where(inner, snapped, nominal)

  def examples(self, indices: np.ndarray, keys: np.ndarray) -> base.Batch:
    starts, lengths = self.window(indices)
    rows = len(starts)
    body = self._stream.read(starts, lengths, self._width)
    ids = np.zeros((rows, self.seq_len), np.int32)
    ids[:, 0] = CLS_ID
    ids[:, 1:-1] = body
    ids[np.arange(rows), lengths + 1] = SEP_ID
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids)}
