"""Documents to BERT examples: `[CLS] A [SEP] B [SEP]` segment pairs that fill `seq_len`.

Follows the original BERT data creation (create_pretraining_data.py):
- segments (sentences) of a document are gathered until they reach a target length, which is
  `seq_len - 3`, or with probability `short_seq_prob` a random shorter length, so the model also
  sees short inputs;
- A is a random prefix of the gathered segments; B is the rest (the actual next text) or, with
  probability `random_next_prob`, text from a random other document (the NSP label is 1), in
  which case the unused segments are put back for the next example;
- the longer of A and B is truncated, one token at a time from a random end.
Unlike the original, a single gathered segment is split in two rather than always paired with
a random B, so "B is random" happens with probability `random_next_prob`, not more.
With `random_next_prob=0` (no NSP) B is always the actual continuation.
"""

import dataclasses

import numpy as np

from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from jaxlm.errors import UserError

TokenDocument = list[np.ndarray]  # Segments (sentences) of token ids.


@dataclasses.dataclass(frozen=True)
class Examples:
  """A columnar set of examples, all `[N, seq_len]` or `[N]`."""

  input_ids: np.ndarray  # int32, [CLS] A [SEP] B [SEP] then PAD.
  token_type_ids: np.ndarray  # int32, 0 over [CLS] A [SEP], 1 over B [SEP].
  next_sentence_label: np.ndarray  # int32, 1 when B is from another document.
  document: np.ndarray  # int32, the document A came from (for tests and analysis).

  def __len__(self) -> int:
    return len(self.input_ids)

  def take(self, indices: np.ndarray) -> "Examples":
    return Examples(*(getattr(self, f.name)[indices] for f in dataclasses.fields(self)))


def build_pairs(
    documents: list[TokenDocument],
    *,
    seq_len: int,
    short_seq_prob: float,
    random_next_prob: float,
    rng: np.random.Generator,
) -> Examples:
  """Builds every example of one pass over `documents`, shuffled."""
  rows: list[tuple[np.ndarray, np.ndarray, int, int]] = []
  for doc_index in range(len(documents)):
    rows.extend(_pairs_from_document(documents, doc_index, seq_len, short_seq_prob,
                                     random_next_prob, rng))
  if not rows:
    raise UserError(
        "No examples could be built: the documents are empty (or have one token each). Check "
        "data.train_files / data.eval_files."
    )
  order = rng.permutation(len(rows))
  input_ids = np.full((len(rows), seq_len), PAD_ID, np.int32)
  token_type_ids = np.zeros((len(rows), seq_len), np.int32)
  labels = np.zeros(len(rows), np.int32)
  docs = np.zeros(len(rows), np.int32)
  for out, i in enumerate(order):
    a, b, label, doc = rows[i]
    n = len(a) + len(b) + 3
    input_ids[out, :n] = np.concatenate([[CLS_ID], a, [SEP_ID], b, [SEP_ID]])
    token_type_ids[out, len(a) + 2:n] = 1
    labels[out], docs[out] = label, doc
  return Examples(input_ids, token_type_ids, labels, docs)


def _pairs_from_document(documents, doc_index, seq_len, short_seq_prob, random_next_prob, rng):
  document = documents[doc_index]
  max_tokens = seq_len - 3
  target = _target_length(max_tokens, short_seq_prob, rng)
  chunk: list[np.ndarray] = []
  chunk_len = 0
  i = 0
  while i < len(document):
    chunk.append(document[i])
    chunk_len += len(document[i])
    if i == len(document) - 1 or chunk_len >= target:
      a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
      tokens_a = np.concatenate(chunk[:a_end])
      random_next = len(documents) > 1 and rng.random() < random_next_prob
      if random_next:
        tokens_b = _random_segment(documents, doc_index, max(1, target - len(tokens_a)), rng)
        i -= len(chunk) - a_end  # Put the unused segments back.
      elif len(chunk) >= 2:
        tokens_b = np.concatenate(chunk[a_end:])
      else:  # One long segment: split it, so B still follows A.
        cut = int(rng.integers(1, len(tokens_a))) if len(tokens_a) >= 2 else len(tokens_a)
        tokens_a, tokens_b = tokens_a[:cut], tokens_a[cut:]
      tokens_a, tokens_b = _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
      if len(tokens_a) and len(tokens_b):
        yield tokens_a, tokens_b, int(random_next), doc_index
      chunk, chunk_len = [], 0
      target = _target_length(max_tokens, short_seq_prob, rng)
    i += 1


def _target_length(max_tokens: int, short_seq_prob: float, rng: np.random.Generator) -> int:
  if rng.random() < short_seq_prob:
    return int(rng.integers(2, max_tokens + 1))
  return max_tokens


def _random_segment(documents, doc_index, length, rng) -> np.ndarray:
  """Text of about `length` tokens from a random document other than `doc_index`."""
  other = int(rng.integers(0, len(documents) - 1))
  other += other >= doc_index  # Uniform over the other documents.
  segments = documents[other]
  start = int(rng.integers(0, len(segments)))
  taken, total = [], 0
  for segment in segments[start:]:
    taken.append(segment)
    total += len(segment)
    if total >= length:
      break
  return np.concatenate(taken)


def _truncate_pair(a, b, max_tokens, rng):
  """Drops tokens from the longer segment, at a random end each time, until both fit."""
  a_start, a_stop, b_start, b_stop = 0, len(a), 0, len(b)
  while (a_stop - a_start) + (b_stop - b_start) > max_tokens:
    if a_stop - a_start > b_stop - b_start:
      if rng.random() < 0.5:
        a_start += 1
      else:
        a_stop -= 1
    elif rng.random() < 0.5:
      b_start += 1
    else:
      b_stop -= 1
  return a[a_start:a_stop], b[b_start:b_stop]
