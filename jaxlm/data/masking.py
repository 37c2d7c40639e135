"""BERT's masked-LM corruption, vectorised over a batch in numpy.

Per sequence, `rate` of the non-special tokens are chosen (at least 1, at most
`max_predictions`); of those, 80% become [MASK], 10% a random regular token, 10% stay. With
`whole_word`, all pieces of a word are chosen together, as in BERT's whole-word masking.

Randomness is counter-based (`jaxlm.data.random`): every number a row uses is a hash of that
row's key, so what a sequence gets depends only on its own key: not on the batch it sits in, nor
on how the batch is split across hosts. Nothing loops over rows or positions; the whole-word
greedy fill loops over word ranks, vectorised over rows.
"""

import dataclasses
from collections.abc import Iterator

import numpy as np

from jaxlm.data import random
from jaxlm.data.tokenizer import MASK_ID, NUM_SPECIAL

# Independent draws of a row's key: the choice order of pieces (or of words, by their first
# piece), then per prediction slot the 80/10/10 action and the random replacement token.
_CHOOSE_DRAW, _ACTION_DRAW, _REPLACEMENT_DRAW = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class MaskingOptions:
  rate: float = 0.15
  max_predictions: int = 20
  mask_token_prob: float = 0.8
  random_token_prob: float = 0.1
  whole_word: bool = False


def mask_tokens(
    input_ids_BL: np.ndarray,
    keys_B: np.ndarray,
    options: MaskingOptions,
    *,
    vocab_size: int,
    word_start_V: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Returns the corrupted `input_ids` and the `[B, max_predictions]` prediction targets.

  `keys_B` holds one uint64 key per row (`random.row_keys`); `vocab_size` is the tokenizer's
  (random replacements are drawn from its regular pieces); `word_start_V[id]` says whether a
  piece begins a word, needed for whole-word masking.
  """
  input_ids_BL = np.ascontiguousarray(input_ids_BL)  # Flat indices below assume C order.
  batch, length = input_ids_BL.shape
  keys_B = np.asarray(keys_B)
  if keys_B.shape != (batch,):
    raise ValueError(f"mask_tokens needs one key per row: keys {keys_B.shape}, batch {batch}")
  if options.whole_word and word_start_V is None:
    raise ValueError("whole-word masking needs the tokenizer's word_start table")
  p = options.max_predictions

  candidate_BL = input_ids_BL >= NUM_SPECIAL
  n_candidates_B = np.count_nonzero(candidate_BL, axis=1)
  n_predict_B = np.minimum(p, np.maximum(1, np.round(n_candidates_B * options.rate))).astype(int)
  n_predict_B = np.minimum(n_predict_B, n_candidates_B)

  if options.whole_word:
    choose_key_BL = random.uniform(keys_B, _CHOOSE_DRAW, (length,))
    chosen_BL = _choose_whole_words(
        input_ids_BL, candidate_BL, word_start_V, choose_key_BL, n_predict_B
    )
    positions_BP, weights_BP = _slots_of(chosen_BL, p)
  else:
    positions_BP, weights_BP = _choose_pieces(keys_B, candidate_BL, n_predict_B, p)

  # Chosen positions fill the first slots, in sequence order; padding slots are position 0.
  # Gathers and scatters go through flat indices: cheaper than 2-d fancy indexing.
  flat_BP = positions_BP + (np.arange(batch) * length)[:, None]
  labels_BP = np.where(weights_BP, np.take(input_ids_BL, flat_BP), 0).astype(np.int32)
  # Each slot's own action and replacement token: i.i.d. per chosen token, like per position.
  action_BP = random.uniform(keys_B, _ACTION_DRAW, (p,))
  replacement_BP = random.integers(keys_B, _REPLACEMENT_DRAW, NUM_SPECIAL, vocab_size, (p,))
  new_BP = np.where(
      action_BP < options.mask_token_prob,
      MASK_ID,
      np.where(action_BP < options.mask_token_prob + options.random_token_prob,
               replacement_BP, labels_BP),
  )
  corrupted_BL = input_ids_BL.astype(np.int32)  # A copy.
  corrupted_BL.reshape(-1)[flat_BP[weights_BP]] = new_BP[weights_BP]
  return {
      "input_ids": corrupted_BL,
      "mlm_positions": positions_BP,
      "mlm_ids": labels_BP,
      "mlm_weights": weights_BP.astype(np.float32),
  }


def _row_blocks(batch: int, length: int) -> Iterator[slice]:
  """Slices of rows with ~64 KiB of float64 per [rows, L] array.

  Per-piece choosing works on blocks of rows because fresh [B, L] temporaries can cost more
  than the arithmetic: glibc returns freed heap to the kernel past its trim threshold (128 KiB
  by default) and maps blocks over 128 KiB afresh, and every new page is then a fault, a few
  microseconds each in a VM. Rows are independent, so blocks change nothing in the result.
  (The whole-word path is not blocked: its rank loop would run once per block.)
  """
  rows_per_block = max(1, 8192 // max(length, 1))
  for start in range(0, batch, rows_per_block):
    yield slice(start, start + rows_per_block)


def _position_mask(length: int) -> int:
  """The low bits of a folded key that hold its position (see `_fold_positions`)."""
  return 2 ** max(1, (length - 1).bit_length()) - 1


def _fold_positions(key_BL, member_BL):
  """Turns float keys in [0, 1) into distinct ones that carry their position, in place.

  floor(key * 2**(53 - b)) * 2**b + position (b bits hold a position): an integer below 2**53,
  exact in float64, so a plain value sort ranks positions, and ties cannot happen; non-members
  get 2**53, above all members. (Arithmetic, not np.where: a select on a random mask
  mispredicts branches and costs several times more.)
  """
  length = key_BL.shape[1]
  scale = float(_position_mask(length) + 1)
  key_BL *= 2.0**53 / scale
  np.floor(key_BL, out=key_BL)
  key_BL *= scale
  key_BL += np.arange(length, dtype=np.float64) - 2.0**53  # Exact: integers of magnitude <= 2**53.
  key_BL *= member_BL
  key_BL += 2.0**53
  return key_BL


def _choose_pieces(keys_B, candidate_BL, n_predict_B, p):
  """The `n_predict` candidates of smallest choice draw per row, as positions in order and
  weights.

  With positions folded into the keys, no [B, L] argsort is needed: an in-place partition
  keeps the p smallest, and only that [B, p] corner is sorted (by key, then by position).
  """
  batch, length = candidate_BL.shape
  k = min(p, length)
  smallest_BK = np.empty((batch, k))
  for rows in _row_blocks(batch, length):
    keyed_bL = _fold_positions(random.uniform(keys_B[rows], _CHOOSE_DRAW, (length,)),
                               candidate_BL[rows])
    if k < length:
      keyed_bL.partition(k - 1, axis=1)
    smallest_BK[rows] = np.sort(keyed_bL[:, :k], axis=1)
  weights_BK = np.arange(k) < n_predict_B[:, None]
  positions_BK = (smallest_BK.astype(np.int64) & _position_mask(length)).astype(np.int32)
  # Unused slots sort last (as `length`), then become position 0.
  positions_BK[~weights_BK] = length
  positions_BK.sort(axis=1)
  positions_BK[~weights_BK] = 0
  return _pad_slots(positions_BK, weights_BK, p)


def _slots_of(chosen_BL, p):
  """The chosen positions of each row in order, as `[B, p]` positions and weights."""
  batch, length = chosen_BL.shape
  k = min(p, length)
  flat = np.flatnonzero(chosen_BL)  # Row-major: each row's positions in order.
  rows, cols = np.divmod(flat, length)
  count_B = np.count_nonzero(chosen_BL, axis=1)
  first_B = np.cumsum(count_B) - count_B
  slots = np.arange(len(flat)) - first_B[rows]
  positions_BK = np.zeros((batch, k), np.int32)
  positions_BK.reshape(-1)[rows * k + slots] = cols
  weights_BK = np.arange(k) < count_B[:, None]
  return _pad_slots(positions_BK, weights_BK, p)


def _pad_slots(positions_BK, weights_BK, p):
  """Pads to p slots when the sequence is shorter than max_predictions."""
  if positions_BK.shape[1] == p:
    return positions_BK, weights_BK
  pad = ((0, 0), (0, p - positions_BK.shape[1]))
  return np.pad(positions_BK, pad), np.pad(weights_BK, pad)


def _choose_whole_words(input_ids_BL, candidate_BL, word_start_V, key_BL, n_predict_B):
  """Chooses whole words in random order while their pieces fit in `n_predict`.

  A word is a candidate piece that starts a word (or follows a special token) plus the
  continuation pieces right after it; its key is its first piece's. A word that would overflow
  the budget is skipped, as in BERT, and later (shorter) words still fit. The greedy fill is
  sequential in a row's word order, so it loops over ranks (until every row is done), vectorised
  over rows. Overwrites `key_BL`.
  """
  batch, length = input_ids_BL.shape
  starts_BL = np.take(np.asarray(word_start_V, bool), input_ids_BL)
  starts_BL[:, 1:] |= ~candidate_BL[:, :-1]  # A piece after a special token starts a word.
  starts_BL &= candidate_BL
  starts_BL[:, 0] = candidate_BL[:, 0]
  n_words_B = np.count_nonzero(starts_BL, axis=1)
  n_words = int(n_words_B.max(initial=0))
  if n_words == 0:
    return starts_BL

  # A word's size, at its start: the distance to the next start or non-candidate after it.
  # Two int64 [B, L] buffers serve throughout (numpy's int64 accumulate is the fast one), and
  # selects are arithmetic on masks, not np.where (see `_fold_positions`).
  position_L = np.arange(length)
  boundary_BL = np.multiply(starts_BL | ~candidate_BL, position_L - length)
  boundary_BL += length  # Position at a start or non-candidate, else length.
  size_BL = np.empty_like(boundary_BL)
  size_BL[:, -1] = length
  np.minimum.accumulate(boundary_BL[:, :0:-1], axis=1, out=size_BL[:, -2::-1])
  size_BL -= position_L  # The next boundary's distance; at a start, its word's size.

  # Words in key order: [B, W] start positions and sizes; ranks past a row's words never fit.
  keyed_BL = _fold_positions(key_BL, starts_BL)
  keyed_BL.sort(axis=1)
  row_offset_B1 = (np.arange(batch) * length)[:, None]
  ranked_flat_BW = keyed_BL[:, :n_words].astype(np.int64)
  ranked_flat_BW &= _position_mask(length)
  ranked_flat_BW += row_offset_B1
  ranked_size_BW = np.take(size_BL, ranked_flat_BW)
  ranked_size_BW[np.arange(n_words) >= n_words_B[:, None]] = length + 1
  # smallest_left[w]: the smallest word at rank >= w; a row whose budget is below it is done.
  smallest_left_BW = np.minimum.accumulate(ranked_size_BW[:, ::-1], axis=1)[:, ::-1]
  ranked_size_WB = np.ascontiguousarray(ranked_size_BW.T)
  smallest_left_WB = np.ascontiguousarray(smallest_left_BW.T)

  budget_B = n_predict_B.astype(np.int64)
  take_WB = np.zeros((n_words, batch), bool)
  for w in range(n_words):
    if (budget_B < smallest_left_WB[w]).all():
      break
    np.less_equal(ranked_size_WB[w], budget_B, out=take_WB[w])
    budget_B -= ranked_size_WB[w] * take_WB[w]

  # Back to pieces: a piece is chosen when the start of its word is.
  chosen_start_BL = np.zeros((batch, length), bool)
  chosen_start_BL.reshape(-1)[ranked_flat_BW.T[take_WB]] = True
  start_of_BL = np.multiply(starts_BL, position_L, out=boundary_BL)
  np.maximum.accumulate(start_of_BL, axis=1, out=start_of_BL)
  start_of_BL += row_offset_B1
  return candidate_BL & np.take(chosen_start_BL, start_of_BL)
