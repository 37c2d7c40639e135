"""`pairs`, as in BERT: `[CLS] A [SEP] B [SEP]`, B the text after A or (NSP) from another document.

Each document is tiled by chunks of at most `seq_len - 3` tokens that start at a sentence wherever
one lies in their slack (`base.slack_of`), so one pass over the chunks reaches every token. For
chunk i, with the example's own random key:
- with probability `short_seq_prob` only a random-length prefix of 2 .. seq_len - 3 tokens is
  used, so the model also sees short inputs (BERT's `short_seq_prob`);
- A ends at a random sentence boundary inside the chunk (at a random token when there is none);
- B is the rest of the chunk (label 0) or, with probability `random_next_prob`, as many tokens
  from a random other document, starting at a sentence there (label 1). Both labels thus have
  the same lengths: a model cannot tell them apart by where the padding starts.
Unlike BERT's script, the chunks are fixed by the document's length and sentence starts alone,
so example i is computed without building the others; when B is random, the rest of the chunk is
not used by that example (BERT puts it back into the next one). A sentence longer than a chunk is
cut across chunks.
"""

import numpy as np

from jaxlm.data import random as random_lib
from jaxlm.data.formats import base
from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID

_SHORT, _TARGET, _NEXT, _CUT, _OTHER_DOC, _OTHER_POS = range(6)


@base.register
class Pairs(base.Format):
  name = "pairs"
  extra_fields = {"next_sentence_label": -1}

  def __init__(self, split, seq_len, *, short_seq_prob: float = 0.1, random_next_prob: float = 0.0):
    super().__init__(split, seq_len)
    self.short_seq_prob, self.random_next_prob = short_seq_prob, random_next_prob
    self._width = seq_len - 3
    starts = split.document_starts
    self._doc_lengths = np.diff(starts)
    self._chunks = base.windows_for(self._doc_lengths, self._width)
    self._first_chunk = np.concatenate([[0], np.cumsum(self._chunks)])

  def __len__(self) -> int:
    return int(self._first_chunk[-1])

  def chunk(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Document, start and end (token offsets in the split) of chunks `indices`."""
    indices = np.asarray(indices, np.int64)
    document = np.searchsorted(self._first_chunk, indices, side="right") - 1
    j = indices - self._first_chunk[document]
    return document, self._chunk_start(document, j), self._chunk_start(document, j + 1)

  def _chunk_start(self, document, j):
    count, length = self._chunks[document], self._doc_lengths[document]
    doc_start = self.split.document_starts[document]
    nominal = doc_start + base.window_starts(count, length, j)
    inner = (j > 0) & (j < count)
    found = self.split.sentence_start_at_or_before(np.minimum(nominal, self.split.num_tokens - 1))
    snapped = np.where(found >= nominal - base.slack_of(self._width), found, nominal)
    return np.where(inner, snapped, nominal)

  def examples(self, indices: np.ndarray, keys: np.ndarray) -> base.Batch:
    rows = len(indices)
    u = random_lib.uniform(keys, 0, (6,))
    document, a, end = self.chunk(indices)
    short = u[:, _SHORT] < self.short_seq_prob
    target = np.where(short, 2 + (u[:, _TARGET] * (self._width - 1)).astype(np.int64), self._width)
    end = np.minimum(end, a + target)
    size = end - a

    # A ends at a sentence start strictly inside the chunk, else at a random token.
    boundary = self.split.sentence_start_between(a, end, u[:, _CUT])
    random_cut = a + 1 + (u[:, _CUT] * np.maximum(size - 1, 0)).astype(np.int64)
    cut = np.where(size < 2, end, np.where(boundary >= 0, boundary, random_cut))
    a_len = cut - a

    documents = self.split.num_documents
    random_next = (u[:, _NEXT] < self.random_next_prob) & (documents > 1)
    other = (u[:, _OTHER_DOC] * max(documents - 1, 1)).astype(np.int64)
    other += other >= document
    other = np.minimum(other, documents - 1)
    want = np.maximum(end - cut, 1)
    # A random place in the other document that leaves `want` tokens after it where it can,
    # moved back to the start of its sentence.
    room = np.maximum(self._doc_lengths[other] - want + 1, 1)
    other_pos = self.split.document_starts[other] + (u[:, _OTHER_POS] * room).astype(np.int64)
    other_b = self.split.sentence_start_at_or_before(other_pos)
    other_len = np.minimum(want, self.split.document_starts[other + 1] - other_b)
    b_start = np.where(random_next, other_b, cut)
    b_len = np.where(random_next, other_len, end - cut)

    positions = np.arange(self.seq_len)
    in_a = (positions >= 1) & (positions <= a_len[:, None])
    b_first = a_len[:, None] + 2
    in_b = (positions >= b_first) & (positions < b_first + b_len[:, None])
    offsets = np.where(in_a, a[:, None] + positions - 1,
                       np.where(in_b, b_start[:, None] + positions - b_first, 0))
    tokens = self.split.take(offsets)
    ids = np.where(in_a | in_b, tokens, PAD_ID)
    ids[:, 0] = CLS_ID
    ids[np.arange(rows), a_len + 1] = SEP_ID
    last = a_len + b_len + 2
    ids[np.arange(rows), last] = SEP_ID
    token_types = ((positions >= b_first) & (positions <= last[:, None])).astype(np.int32)
    return {"input_ids": ids.astype(np.int32), "token_type_ids": token_types,
            "next_sentence_label": random_next.astype(np.int32)}
