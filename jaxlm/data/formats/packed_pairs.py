"""`pairs` packed: several BERT pairs in one row, so that padding positions cost nothing.

A `pairs` row holds one example and pads the rest: 18% of the positions at seq_len 128 and 28%
at 512 on the kernel docs (a document's last chunk is short; so are `short_seq_prob`'s). Every
padded position costs the same FLOPs as text. Packing, as in MLPerf's BERT and Krell et al.
(2021, "Efficient sequence packing without cross-contamination"), lays short examples side by
side in one row; the model keeps them apart:
- `example_ids` (1..K per example, 0 on padding): attention stays inside an example;
- `position_ids` restart at 0 for each example;
- `cls_positions` [K]: where each example's [CLS] is, for the NSP pooler; `next_sentence_label`
  becomes [K], -1 where a row has fewer examples.
So a packed example gets exactly the logits it would get alone (tests/test_packing.py).

Chunks fill the row (`_FilledPairs`): a document is cut every `seq_len - 3` tokens (at a sentence
start within the slack), so only its last chunk is short; `pairs` alone spreads a document
evenly over its chunks, which leaves every row about an eighth empty and nothing to pack.
Which chunks share a row is planned once from the chunks' lengths alone (best-fit decreasing,
at most `max_examples` per row), before any random draw: a row is a fixed set of chunks, and
example i of the format is row i of the plan, so random access, epochs and exact resume work as
for any format. Each chunk is then made into a pair by `Pairs.examples` with its own key (a hash
of the row's key and its slot): short prefixes, the A/B cut and random-next B are drawn as
usual, and can only shorten an example, so a row never overflows.
"""

import numpy as np

from jaxlm.data import random as random_lib
from jaxlm.data.formats import base
from jaxlm.data.formats.pairs import Pairs
from jaxlm.data.tokenizer import PAD_ID

PACKED_FIELDS = ("example_ids", "position_ids", "cls_positions")


def plan_rows(lengths: np.ndarray, capacity: int, max_items: int) -> np.ndarray:
  """Best-fit decreasing: `[rows, max_items]` item indices (-1 = empty slot), each row's
  lengths summing to at most `capacity`.

  Items are taken longest first (ties by index, so every host plans the same rows); each goes
  into the open row it fills most tightly, else opens a row. Rows left with less room than the
  shortest item, or holding `max_items`, close. Items that fill a row alone skip the loop.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.max() > capacity or lengths.min() < 1):
    raise ValueError(f"item lengths must be in [1, {capacity}]")
  smallest = int(lengths.min()) if lengths.size else 1
  alone = lengths > capacity - smallest
  rows: list[list[int]] = []
  # open_by_room[r]: indices into `rows` of open rows with exactly r free positions; bit r of
  # `rooms` is set while that list is not empty, so the tightest fit is one bit search.
  open_by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
  rooms = 0
  shared = np.flatnonzero(~alone)
  for item in shared[np.argsort(-lengths[shared], kind="stable")].tolist():
    size = int(lengths[item])
    above = rooms >> size
    if above:
      fit = size + (above & -above).bit_length() - 1
      row, room = open_by_room[fit].pop(), fit
      if not open_by_room[fit]:
        rooms &= ~(1 << fit)
    else:
      row, room = len(rows), capacity
      rows.append([])
    rows[row].append(item)
    room -= size
    if room >= smallest and len(rows[row]) < max_items:
      open_by_room[room].append(row)
      rooms |= 1 << room
  singles = np.flatnonzero(alone)
  plan = np.full((len(singles) + len(rows), max_items), -1, np.int64)
  plan[:len(singles), 0] = singles
  for i, members in enumerate(rows, start=len(singles)):
    plan[i, :len(members)] = members
  return plan


class PackedPairs(base.Format):
  """`pairs` with up to `max_examples` examples per row (module docstring)."""

  name = "pairs"
  extra_fields = {"next_sentence_label": -1}

  def __init__(self, split, seq_len, *, max_examples: int, short_seq_prob: float = 0.1,
               random_next_prob: float = 0.0):
    super().__init__(split, seq_len)
    if max_examples < 2:
      raise ValueError("packing needs max_examples >= 2")
    self.max_examples = max_examples
    self.pairs = _FilledPairs(split, seq_len, short_seq_prob=short_seq_prob,
                              random_next_prob=random_next_prob)
    self.plan = plan_rows(example_length_bound(self.pairs.ends - self.pairs.starts), seq_len,
                          max_examples)

  def __len__(self) -> int:
    return len(self.plan)

  def examples(self, indices: np.ndarray, keys: np.ndarray) -> base.Batch:
    members_BK = self.plan[np.asarray(indices, np.int64)]
    rows, k = members_BK.shape
    present_BK = members_BK >= 0
    member_keys_BK = random_lib.row_keys(0, np.asarray(keys, np.uint64)[:, None], np.arange(k))
    singles = self.pairs.examples(members_BK[present_BK], member_keys_BK[present_BK])
    return pack_examples(singles, present_BK, self.seq_len)

  def padding(self, rows: int) -> base.Batch:
    out = super().padding(rows)
    k = self.max_examples
    out.update(next_sentence_label=np.full((rows, k), -1, np.int32),
               example_ids=np.zeros((rows, self.seq_len), np.int32),
               position_ids=np.zeros((rows, self.seq_len), np.int32),
               cls_positions=np.zeros((rows, k), np.int32))
    return out


class _FilledPairs(Pairs):
  """`Pairs` over chunks that fill the row: each document is cut every `seq_len - 3` tokens
  (moved back to a sentence start within the slack, `base.slack_of`), leaving one short chunk
  at its end, for packing to fill. `Pairs` itself spreads a document evenly over its chunks
  instead, which leaves no chunk short but every row about an eighth empty."""

  def __init__(self, split, seq_len, **options):
    super().__init__(split, seq_len, **options)
    self.documents, self.starts, self.ends = _fill_chunks(split, self._width)

  def __len__(self) -> int:
    return len(self.starts)

  def chunk(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    return self.documents[indices], self.starts[indices], self.ends[indices]


def _fill_chunks(split, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Document, start and end of every chunk, in text order: chunks of `width` tokens, each
  ending at the last sentence start within the slack before that where there is one."""
  document_starts = np.asarray(split.document_starts, np.int64)
  ends_of_document = document_starts[1:]
  active = np.flatnonzero(np.diff(document_starts) > 0)
  position = document_starts[:-1].copy()
  slack = base.slack_of(width)
  found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
  while active.size:  # One chunk of every unfinished document per pass.
    start, doc_end = position[active], ends_of_document[active]
    nominal = start + width
    last = nominal >= doc_end
    sentence = split.sentence_start_at_or_before(np.minimum(nominal, split.num_tokens - 1))
    snapped = np.where((sentence > start) & (sentence >= nominal - slack), sentence, nominal)
    end = np.where(last, doc_end, snapped)
    found.append((active, start, end))
    position[active] = end
    active = active[~last]
  if not found:
    empty = np.zeros(0, np.int64)
    return empty, empty, empty
  documents, starts, ends = (np.concatenate(parts) for parts in zip(*found))
  order = np.argsort(starts, kind="stable")
  return documents[order], starts[order], ends[order]


def example_length_bound(chunk_sizes: np.ndarray) -> np.ndarray:
  """The most positions `Pairs.examples` can fill from a chunk of this many tokens: the chunk,
  [CLS] and two [SEP]s; a one-token chunk may take one more token as a random-next B."""
  sizes = np.asarray(chunk_sizes, np.int64)
  return sizes + 3 + (sizes < 2)


def pack_examples(singles: base.Batch, present_BK: np.ndarray, seq_len: int) -> base.Batch:
  """Lays the one-example rows `singles` (in row-major order of `present_BK`) side by side.

  Each single row is its example followed by padding; its first `length` positions are copied
  to the next free position of its packed row.
  """
  rows, k = present_BK.shape
  lengths = np.zeros((rows, k), np.int64)
  lengths[present_BK] = np.count_nonzero(singles["input_ids"] != PAD_ID, axis=1)
  ends_BK = np.cumsum(lengths, axis=1)
  if rows and ends_BK[:, -1].max() > seq_len:
    raise ValueError("packed examples overflow the row")
  starts_BK = ends_BK - lengths
  positions = np.arange(seq_len)
  slot_BL = np.sum(positions[None, :, None] >= ends_BK[:, None, :], axis=2)  # k = past the end.
  used_BL = slot_BL < k
  slot_BL = np.minimum(slot_BL, k - 1)
  within_BL = positions[None, :] - np.take_along_axis(starts_BK, slot_BL, axis=1)
  # Row of `singles` holding (packed row b, slot j): its rank among the present slots.
  single_of_BK = np.cumsum(present_BK.ravel()).reshape(rows, k) - 1
  source_BL = np.take_along_axis(single_of_BK, slot_BL, axis=1)
  source_BL = np.where(used_BL, source_BL, 0)
  within_BL = np.where(used_BL, within_BL, 0)
  out = {}
  for key in ("input_ids", "token_type_ids"):
    values = singles[key][source_BL, within_BL] if len(singles[key]) else np.zeros(
        (rows, seq_len), np.int32)
    out[key] = np.where(used_BL, values, 0).astype(np.int32)
  out["example_ids"] = np.where(used_BL, slot_BL + 1, 0).astype(np.int32)
  out["position_ids"] = within_BL.astype(np.int32)
  out["cls_positions"] = np.where(present_BK, starts_BK, 0).astype(np.int32)
  labels = np.full((rows, k), -1, np.int32)
  labels[present_BK] = singles["next_sentence_label"]
  out["next_sentence_label"] = labels
  return out
