"""BERT's masked-LM corruption, vectorised over a batch in numpy.

Per sequence, `rate` of the non-special tokens are chosen (at least 1, at most
`max_predictions`); of those, 80% become [MASK], 10% a random regular token, 10% stay. With
`whole_word`, all pieces of a word are chosen together, as in BERT's whole-word masking.

Randomness is counter-based (`jaxlm.data.random`): every number a row uses is a hash of that
row's key, so what a sequence gets depends only on its own key: not on the batch it sits in, nor
on how the batch is split across hosts. Nothing loops over rows except the whole-word greedy fill,
which loops over word ranks, vectorised over rows.
"""

import dataclasses

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
  choose_key_BL = random.uniform(keys_B, _CHOOSE_DRAW, (length,))

  if options.whole_word:
    chosen_BL = _choose_whole_words(
        input_ids_BL, candidate_BL, word_start_V, choose_key_BL, n_predict_B
    )
    positions_BP, weights_BP = _slots_of(chosen_BL, p)
  else:
    positions_BP, weights_BP = _choose_pieces(choose_key_BL, candidate_BL, n_predict_B, p)

  # Chosen positions fill the first slots, in sequence order; padding slots are position 0.
  labels_BP = np.where(weights_BP, np.take_along_axis(input_ids_BL, positions_BP, 1), 0)
  action_BP = random.uniform(keys_B, _ACTION_DRAW, (p,))
  replacement_BP = random.integers(keys_B, _REPLACEMENT_DRAW, NUM_SPECIAL, vocab_size, (p,))
  new_BP = np.where(
      action_BP < options.mask_token_prob,
      MASK_ID,
      np.where(action_BP < options.mask_token_prob + options.random_token_prob,
               replacement_BP, labels_BP),
  )
  corrupted_BL = input_ids_BL.astype(np.int32)  # A copy.
  rows, slots = np.nonzero(weights_BP)
  corrupted_BL[rows, positions_BP[rows, slots]] = new_BP[rows, slots]
  return {
      "input_ids": corrupted_BL,
      "mlm_positions": positions_BP,
      "mlm_ids": labels_BP.astype(np.int32),
      "mlm_weights": weights_BP.astype(np.float32),
  }


def _choose_pieces(key_BL, candidate_BL, n_predict_B, p):
  """The `n_predict` candidates of smallest key per row, as sorted positions and weights.

  Position is folded into the low bits of each key, so keys are distinct within a row and carry
  their position through a value sort; that avoids any [B, L] argsort: a partition keeps the p
  smallest, and only the [B, p] leftovers are sorted, twice.
  """
  batch, length = key_BL.shape
  position_bits = max(1, (length - 1).bit_length())
  scale = float(2 ** position_bits)
  # floor(key * 2**(53 - bits)) * 2**bits + position: an integer below 2**53, exact in float64.
  keyed_BL = np.floor(key_BL * 2.0 ** (53 - position_bits))
  keyed_BL *= scale
  keyed_BL += np.arange(length, dtype=np.float64)
  keyed_BL[~candidate_BL] = 2.0**53  # Above every candidate's key.
  k = min(p, length)
  if k < length:
    keyed_BL = np.partition(keyed_BL, k - 1, axis=1)[:, :k]
  smallest_BK = np.sort(keyed_BL, axis=1)[:, :k]
  weights_BK = np.arange(k) < n_predict_B[:, None]
  # Unused slots sort last (sentinel = length), then become position 0.
  # (np.fmod is slow on values near 2**53: an integer mask instead.)
  positions_BK = smallest_BK.astype(np.int64) & (2**position_bits - 1)
  positions_BK = np.where(weights_BK, positions_BK, length).astype(np.int32)
  positions_BK.sort(axis=1)
  positions_BK[~weights_BK] = 0
  return _pad_slots(positions_BK, weights_BK, p)


def _slots_of(chosen_BL, p):
  """The chosen positions of each row in order, as `[B, p]` positions and weights."""
  batch, length = chosen_BL.shape
  rows, cols = np.nonzero(chosen_BL)  # Row-major: each row's positions in order.
  count_B = np.bincount(rows, minlength=batch)
  first_B = np.cumsum(count_B) - count_B
  slots = np.arange(len(rows)) - first_B[rows]
  k = min(p, length)
  positions_BK = np.zeros((batch, k), np.int32)
  positions_BK[rows, slots] = cols
  weights_BK = np.arange(k) < count_B[:, None]
  return _pad_slots(positions_BK, weights_BK, p)


def _pad_slots(positions_BK, weights_BK, p):
  """Pads to p slots when the sequence is shorter than max_predictions."""
  pad = ((0, 0), (0, p - positions_BK.shape[1]))
  return np.pad(positions_BK, pad), np.pad(weights_BK, pad)


def _choose_whole_words(input_ids_BL, candidate_BL, word_start_V, key_BL, n_predict_B):
  """Chooses whole words in random order while their pieces fit in `n_predict`.

  A word is a candidate piece that starts a word plus the continuation pieces after it; its key
  is its first piece's. A word that would overflow the budget is skipped, as in BERT, and later
  (shorter) words still fit. The greedy fill is sequential in a row's word order, so it loops
  over ranks (at most the longest row's word count), vectorised over rows.
  """
  batch, length = input_ids_BL.shape
  after_special_BL = np.ones_like(candidate_BL)
  after_special_BL[:, 1:] = ~candidate_BL[:, :-1]
  starts_BL = candidate_BL & (word_start_V[input_ids_BL] | after_special_BL)
  word_BL = np.cumsum(starts_BL, axis=1) - 1  # Word index of each piece (-1 before the first).
  n_words_B = word_BL[:, -1] + 1
  n_words = int(n_words_B.max(initial=0))
  if n_words == 0:
    return np.zeros_like(candidate_BL)

  # Per word [B, W]: its key and size; slots past a row's last word never fit.
  rows, cols = np.nonzero(starts_BL)
  key_BW = np.full((batch, n_words), np.inf)
  key_BW[rows, word_BL[rows, cols]] = key_BL[rows, cols]
  piece_rows, piece_cols = np.nonzero(candidate_BL)
  size_BW = np.bincount(piece_rows * n_words + word_BL[piece_rows, piece_cols],
                        minlength=batch * n_words).reshape(batch, n_words)
  size_BW[np.arange(n_words) >= n_words_B[:, None]] = length + 1

  order_BW = np.argsort(key_BW, axis=1)
  ranked_size_WB = np.take_along_axis(size_BW, order_BW, axis=1).T.copy()
  # smallest_left_WB[w]: the smallest word at rank >= w; a row whose budget is below it is done.
  smallest_left_WB = np.minimum.accumulate(ranked_size_WB[::-1], axis=0)[::-1]
  budget_B = n_predict_B.copy()
  take_WB = np.zeros((n_words, batch), bool)
  for w in range(n_words):
    if (budget_B < smallest_left_WB[w]).all():
      break
    fits_B = ranked_size_WB[w] <= budget_B
    take_WB[w] = fits_B
    budget_B -= np.where(fits_B, ranked_size_WB[w], 0)

  chosen_words_BW = np.zeros((batch, n_words), bool)
  np.put_along_axis(chosen_words_BW, order_BW, take_WB.T, axis=1)
  return candidate_BL & np.take_along_axis(chosen_words_BW, np.maximum(word_BL, 0), axis=1)
