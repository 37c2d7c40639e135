"""A split as one stream: each document's tokens followed by `[SEP]`, the end-of-document mark."""

import numpy as np

from jaxlm.data.formats import base
from jaxlm.data.shards import Split
from jaxlm.data.tokenizer import PAD_ID, SEP_ID


class DocumentStream:
  """Positions of the stream map to tokens: position p of document d is token p - d."""

  def __init__(self, split: Split):
    self.split = split
    documents = split.num_documents
    self.doc_starts = split.document_starts + np.arange(documents + 1)  # In stream positions.
    self.length = int(self.doc_starts[-1])

  def read(self, starts: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """[rows, width] ids of stream ranges [start, start + length), then PAD."""
    positions = starts[:, None] + np.arange(width)
    valid = np.arange(width) < lengths[:, None]
    positions = np.where(valid, positions, 0)
    document = np.searchsorted(self.doc_starts, positions, side="right") - 1
    is_end = positions == self.doc_starts[document + 1] - 1
    tokens = self.split.take(np.where(is_end, 0, positions - document))
    return np.where(valid, np.where(is_end, SEP_ID, tokens), PAD_ID).astype(np.int32)

  def sentence_start_before(self, positions: np.ndarray, lowest: np.ndarray) -> np.ndarray:
    """The last sentence start at or before each position if it is >= `lowest`, else the position.

    A document's end mark belongs to its last sentence; the position after it starts a sentence.
    """
    document = np.searchsorted(self.doc_starts, positions, side="right") - 1
    token = np.minimum(positions - document, self.split.document_starts[document + 1] - 1)
    found = self.split.sentence_start_at_or_before(token) + document
    return np.where(found >= lowest, found, positions)


class StreamFormat(base.Format):
  """A format that reads the split as one stream of documents (`full_sentences`, `packed`)."""

  def __init__(self, split: Split, seq_len: int):
    super().__init__(split, seq_len)
    self._stream = DocumentStream(split)
