"""`packed`: documents joined by `[SEP]` (end of document) and cut into `seq_len` windows.

What causal and permutation LMs train on: every position holds text, no `[CLS]`, no padding but
in the very last window. Window w is positions [w * seq_len, (w + 1) * seq_len) of the stream.
"""

import numpy as np

from jaxlm.data.formats import base, stream


@base.register
class Packed(stream.StreamFormat):
  name = "packed"

  def __len__(self) -> int:
    return -(-self._stream.length // self.seq_len)

  def examples(self, indices: np.ndarray, keys: np.ndarray) -> base.Batch:
    starts = np.asarray(indices, np.int64) * self.seq_len
    lengths = np.minimum(self.seq_len, self._stream.length - starts)
    ids = self._stream.read(starts, lengths, self.seq_len)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids)}
