"""XLNet's factorisation orders for permuted language modelling, vectorised over a batch in numpy.

Per sequence, 1/K of the regular tokens (K = `partial_prediction`) are targets: single pieces
chosen uniformly, or with `span_targets` spans of whole words as in XLNet's n-gram sampling. The
factorisation order is XLNet's local permutation (an independent random order per block of
`perm_size` positions, blocks in turn); non-targets come first in it, so every target sees them,
and the targets last, predicted in that order.

The result is a slot order, `plm_perm`, that the model uses to reorder the sequence physically
(MPNet's layout): [non-targets by position | fillers by position | targets in order]. The target
section has a static size P = `num_target_slots(L, K)`, so the attention masks are constants of
`(L, P)`; a row with fewer targets starts the section with weight-0 fillers, padding first (it
is masked as a key anyway), then special tokens, and regular non-targets only as a last resort.

Randomness is counter-based (`jaxlm.data.random`), as in masking.py: what a row gets depends only
on its own key and tokens, never on the batch it sits in. Nothing loops over rows or positions;
span targets loop over span attempts (a row's words in random order), vectorised over rows.
"""

import dataclasses

import numpy as np

from jaxlm.data import random
from jaxlm.data.tokenizer import NUM_SPECIAL, PAD_ID

# Independent draws of a row's key: which pieces are targets (or, with spans, the order in which
# words are tried as span starts), each word's span length, and the factorisation order.
_CHOOSE_DRAW, _SPAN_DRAW, _ORDER_DRAW = 0, 1, 2

# Sort keys are int64: a section in bits 61-62 (non-targets, fillers, targets), the position in
# the low bits, and for targets the block and a random number between them (see `_bits`).
_SECTION_SHIFT = 61
_FILLER_SECTION, _TARGET_SECTION = 1 << _SECTION_SHIFT, 2 << _SECTION_SHIFT
_NEVER = 3 << _SECTION_SHIFT  # Above every key: a position that cannot be chosen.


@dataclasses.dataclass(frozen=True)
class PermutationOptions:
  partial_prediction: int = 6  # K: predict 1/K of the (non-special) tokens, the last of the order.
  perm_size: int = 0  # Block size of XLNet's local permutation; 0 = the whole sequence.
  span_targets: bool = False  # Targets are spans of whole words (XLNet's n-gram spans).
  max_span_words: int = 5  # Span length n in words from 1..max_span_words, p(n) ~ 1/n (XLNet).

  def __post_init__(self):
    # Checked here so that no sampler can be built with options the code below cannot honour.
    if self.partial_prediction < 1:
      raise ValueError(f"partial_prediction must be at least 1, got {self.partial_prediction}")
    if self.perm_size < 0:
      raise ValueError(f"perm_size must be at least 0 (0: the whole sequence), got "
                       f"{self.perm_size}")
    if self.max_span_words < 1:
      raise ValueError(f"max_span_words must be at least 1, got {self.max_span_words}")


def num_target_slots(seq_len: int, partial_prediction: int) -> int:
  """P = max(1, round(seq_len / K)): the static number of target slots (XLNet: 512/6 -> 85).

  Rounds half up, like a row's own target count, so a row of seq_len regular tokens has exactly
  P targets and no filler.
  """
  if partial_prediction < 1:
    raise ValueError(f"partial_prediction must be at least 1, got {partial_prediction}")
  return max(1, _round_ratio(seq_len, partial_prediction))


def sample_permutation(
    input_ids_BL: np.ndarray,
    keys_B: np.ndarray,
    options: PermutationOptions,
    *,
    word_start_V: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Returns each row's slot order `plm_perm` [B, L] and `plm_target_weights` [B, P].

  `plm_perm[b, s]` is the original position that slot s holds; the last P slots are the target
  section, whose weights are 1 for real targets and 0 for fillers. `keys_B` holds one uint64 key
  per row (`random.row_keys`); `word_start_V[id]` says whether a piece begins a word, needed for
  span targets.
  """
  input_ids_BL = np.asarray(input_ids_BL)
  if input_ids_BL.ndim != 2 or input_ids_BL.shape[1] < 1:
    raise ValueError(f"sample_permutation needs [B, L] ids with L >= 1, got {input_ids_BL.shape}")
  batch, length = input_ids_BL.shape
  keys_B = np.asarray(keys_B)
  if keys_B.shape != (batch,):
    raise ValueError(f"sample_permutation needs one key per row: keys {keys_B.shape}, "
                     f"batch {batch}")
  if options.span_targets and word_start_V is None:
    raise ValueError("span targets need the tokenizer's word_start table (word_start_V)")
  p = num_target_slots(length, options.partial_prediction)

  valid_BL = input_ids_BL >= NUM_SPECIAL
  n_valid_B = np.count_nonzero(valid_BL, axis=1)
  n_target_B = np.minimum(np.maximum(1, _round_ratio(n_valid_B, options.partial_prediction)),
                          np.minimum(n_valid_B, p))
  if options.span_targets:
    target_BL = _choose_spans(input_ids_BL, valid_BL, np.asarray(word_start_V, bool), keys_B,
                              n_target_B, p, options.max_span_words)
  else:
    target_BL = _choose_pieces(keys_B, valid_BL, n_target_B, p)
  n_target_B = np.count_nonzero(target_BL, axis=1)  # Spans may end above or below the goal.
  filler_BL = _choose_fillers(input_ids_BL, valid_BL, target_BL, p - n_target_B)
  perm_BL = _slot_order(keys_B, target_BL, filler_BL, options.perm_size)
  return {
      "plm_perm": perm_BL,
      "plm_target_weights": (np.arange(p) >= p - n_target_B[:, None]).astype(np.float32),
  }


def _round_ratio(n, k):
  """floor(n / k + 1/2) in exact integer arithmetic (n >= 0, k >= 1): half rounds up."""
  return (2 * n + k) // (2 * k)


def _bits(length: int) -> tuple[int, int]:
  """(position bits, random bits) of a sort key: block, random number and position must fit in
  61 bits, and the random part needs no more than a uniform's 53."""
  position_bits = max(1, (length - 1).bit_length())
  return position_bits, min(53, _SECTION_SHIFT - 2 * position_bits)


def _random_keys(keys_B, draw, length):
  """[B, L] int64 keys, distinct within a row: a random number, then the position in the low
  bits. A plain value sort ranks positions by their draw, and the position tells which it was."""
  position_bits, random_bits = _bits(length)
  key_BL = random.uniform(keys_B, draw, (length,))
  key_BL *= 2.0**random_bits
  key_BL = key_BL.astype(np.int64)  # floor: exact, as 2**random_bits * u has 53 bits at most.
  key_BL <<= position_bits
  key_BL += np.arange(length)
  return key_BL


def _choose_pieces(keys_B, valid_BL, n_target_B, p):
  """[B, L] bool: per row, the `n_target` valid positions of smallest choice draw: a uniform
  subset. Only the P smallest keys are sorted (after an in-place partition) to find each row's
  threshold."""
  length = valid_BL.shape[1]
  key_BL = _random_keys(keys_B, _CHOOSE_DRAW, length)
  key_BL[~valid_BL] = _NEVER
  smallest_BP = np.partition(key_BL, p - 1, axis=1)[:, :p] if p < length else key_BL.copy()
  smallest_BP.sort(axis=1)
  threshold_B1 = np.take_along_axis(smallest_BP, np.maximum(n_target_B - 1, 0)[:, None], axis=1)
  # A row with targets has a valid key at its threshold, so no non-valid position passes it.
  return (key_BL <= threshold_B1) & (n_target_B[:, None] > 0)


def _span_words(u, max_span_words):
  """Span lengths in words from uniforms in [0, 1): n in 1..max_span_words, p(n) ~ 1/n (XLNet)."""
  weights = 1.0 / np.arange(1, max_span_words + 1)
  bounds = np.cumsum(weights[:-1]) / weights.sum()
  return np.searchsorted(bounds, u, side="right") + 1


def _choose_spans(input_ids_BL, valid_BL, word_start_V, keys_B, n_target_B, p, max_span_words):
  """[B, L] bool: spans of whole words until a row has at least `n_target` target pieces.

  Words are as in masking.py's whole-word masking: a valid piece that starts a word (or follows
  a non-valid token, or starts the row) plus the continuation pieces after it. Each word in turn,
  in random order, is tried as a span start with its own length n, cut at the row's end or a
  non-valid token, and after the word that holds the last piece the row still needs (XLNet caps
  n at the pieces still needed; cutting by pieces keeps a row's overshoot below one word, so
  the share of targets stays near 1/K whatever the pieces per word). It is taken
  when the row still needs targets, it overlaps no taken span and it keeps the count within P.
  So a row may end above its goal by less than a span, or below it when no remaining span fits.
  Trying each word once bounds the attempts by the longest row's word count; the loop runs over
  them, vectorised over rows, and stops when no row can take another span.
  """
  batch, length = input_ids_BL.shape
  position_L = np.arange(length)
  starts_BL = np.take(word_start_V, input_ids_BL)
  starts_BL[:, 1:] |= ~valid_BL[:, :-1]
  starts_BL &= valid_BL
  starts_BL[:, 0] = valid_BL[:, 0]
  n_words_B = np.count_nonzero(starts_BL, axis=1)
  n_words = int(n_words_B.max(initial=0))
  if n_words == 0:
    return starts_BL  # All False.

  # At each position, the next word boundary after it (a start or a non-valid token) and the
  # next non-valid token from it (the end of its run of words), else L.
  boundary_BL = np.where(starts_BL | ~valid_BL, position_L, length)
  word_end_BL = np.full_like(boundary_BL, length)
  np.minimum.accumulate(boundary_BL[:, :0:-1], axis=1, out=word_end_BL[:, -2::-1])
  run_end_BL = np.minimum.accumulate(np.where(valid_BL, length, position_L)[:, ::-1], axis=1)
  run_end_BL = run_end_BL[:, ::-1]

  # Words in position order, [B, W]: start, end, and the end of the run they are in.
  flat = np.flatnonzero(starts_BL)  # Row-major: each row's word starts in order.
  rows = flat // length
  slots = np.arange(len(flat)) - (np.cumsum(n_words_B) - n_words_B)[rows]
  is_word_BW = np.arange(n_words) < n_words_B[:, None]
  start_BW = np.full((batch, n_words), length)
  end_BW, run_end_BW = np.zeros_like(start_BW), np.zeros_like(start_BW)
  start_BW[rows, slots] = flat - rows * length
  end_BW[rows, slots] = word_end_BL.reshape(-1)[flat]
  run_end_BW[rows, slots] = run_end_BL.reshape(-1)[flat]

  # Words in random order. Element j of a 1-d draw depends on j alone, not on the batch's word
  # count W; so do the key's bits (from L), so that a row's ranking is its own.
  word_bits, random_bits = _bits(length)
  order_BW = random.uniform(keys_B, _CHOOSE_DRAW, (n_words,))
  order_BW *= 2.0**random_bits
  order_BW = order_BW.astype(np.int64) << word_bits
  order_BW += np.arange(n_words)
  order_BW[~is_word_BW] = _NEVER  # Past a row's words: tried last, and never fit.
  order_BW.sort(axis=1)
  ranked_BW = order_BW & ((1 << word_bits) - 1)
  n_BW = _span_words(random.uniform(keys_B, _SPAN_DRAW, (n_words,)), max_span_words)

  def by_rank(x_BW):
    return np.ascontiguousarray(np.take_along_axis(x_BW, ranked_BW, axis=1).T)

  word_WB, is_word_WB = np.ascontiguousarray(ranked_BW.T), by_rank(is_word_BW)
  n_WB = by_rank(n_BW)
  start_WB, run_end_WB = by_rank(start_BW), by_rank(run_end_BW)
  # No span is smaller than its first word; past a row's words, spans never fit (> P).
  smallest_WB = by_rank(np.where(is_word_BW, end_BW - start_BW, length + 1))
  # smallest_left[w]: the smallest span at rank >= w; a row with less room than that is done.
  smallest_left_WB = np.minimum.accumulate(smallest_WB[::-1], axis=0)[::-1]
  word_offset_B = np.arange(batch) * n_words
  last_word_B = np.maximum(n_words_B - 1, 0) + word_offset_B
  start_W, end_W = start_BW.reshape(-1), end_BW.reshape(-1)
  piece_offset_B, word_end_L = np.arange(batch) * length, word_end_BL.reshape(-1)

  count_B = np.zeros(batch, np.int64)
  taken_WB = np.zeros((n_words, batch), bool)
  # Taken spans as [start, end); the others as [L, 0), which overlaps nothing.
  taken_start_WB = np.full((n_words, batch), length)
  taken_end_WB = np.zeros((n_words, batch), np.int64)
  for w in range(n_words):
    need_B = n_target_B - count_B
    room_B = p - count_B
    if not ((need_B > 0) & (smallest_left_WB[w] <= room_B)).any():
      break
    # n words, cut at the run's end, and at the end of the word that holds the last piece the
    # row still needs.
    start_B = start_WB[w]
    last_B = np.minimum(word_WB[w] + n_WB[w] - 1 + word_offset_B, last_word_B)
    end_B = np.where(start_W[last_B] < run_end_WB[w], end_W[last_B], run_end_WB[w])
    needed_B = np.minimum(start_B + need_B - 1, length - 1) + piece_offset_B
    np.minimum(end_B, word_end_L[np.maximum(needed_B, piece_offset_B)], out=end_B)
    take_B = (need_B > 0) & (end_B - start_B <= room_B) & is_word_WB[w]
    if w:
      overlap_WB = taken_start_WB[:w] < end_B
      overlap_WB &= taken_end_WB[:w] > start_B
      take_B &= ~overlap_WB.any(axis=0)
    taken_WB[w] = take_B
    taken_start_WB[w, take_B] = start_B[take_B]
    taken_end_WB[w, take_B] = end_B[take_B]
    count_B += (end_B - start_B) * take_B

  # Back to pieces: +1 at each taken span's start, -1 at its end (kept apart: one span may end
  # where another starts), and a running sum.
  row_offset_WB = np.arange(batch) * (length + 1)
  edges_BL = np.zeros((2, batch * (length + 1)), np.int8)
  edges_BL[0, (taken_start_WB + row_offset_WB)[taken_WB]] = 1
  edges_BL[1, (taken_end_WB + row_offset_WB)[taken_WB]] = 1
  inside_BL = np.cumsum((edges_BL[0] - edges_BL[1]).reshape(batch, length + 1), axis=1)
  return inside_BL[:, :length] > 0


def _choose_fillers(input_ids_BL, valid_BL, target_BL, n_fill_B):
  """[B, L] bool: `n_fill` non-targets per row for the target section's weight-0 slots.

  Padding first (masked as a key anyway, so hiding it from non-targets costs nothing), then
  special tokens, then regular non-targets; within a kind, the first positions.
  """
  filler_BL = np.zeros(target_BL.shape, bool)
  left_B = n_fill_B
  pad_BL = input_ids_BL == PAD_ID
  kinds = (pad_BL, ~valid_BL & ~pad_BL, valid_BL & ~target_BL)
  for kind_BL in kinds:
    if not left_B.any():
      break
    rank_BL = np.cumsum(kind_BL, axis=1)  # 1-based rank among its kind, at the kind's members.
    filler_BL |= kind_BL & (rank_BL <= left_B[:, None])
    left_B = left_B - np.minimum(left_B, rank_BL[:, -1])
  return filler_BL


def _slot_order(keys_B, target_BL, filler_BL, perm_size):
  """[B, L] int32: the positions in slot order, by one value sort of int64 keys.

  Non-targets and fillers are keyed by section and position; targets by section, then block,
  then the order draw, which gives each block an independent uniform order, blocks in turn
  (XLNet's local permutation). Every key ends in its position, so the sorted keys are the slot
  order once the rest is masked off.
  """
  length = target_BL.shape[1]
  position_bits, random_bits = _bits(length)
  position_L = np.arange(length)
  block_L = position_L // perm_size if 0 < perm_size < length else np.zeros_like(position_L)
  # A target's key less its position: section, block, draw. Selects are arithmetic on masks.
  order_BL = _random_keys(keys_B, _ORDER_DRAW, length)
  order_BL += (block_L << (random_bits + position_bits)) + (_TARGET_SECTION - position_L)
  order_BL *= target_BL
  order_BL += filler_BL * _FILLER_SECTION
  order_BL += position_L
  order_BL.sort(axis=1)
  order_BL &= (1 << position_bits) - 1
  return order_BL.astype(np.int32)
