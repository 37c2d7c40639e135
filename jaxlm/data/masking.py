"""BERT's masked-LM corruption, vectorised over a batch in numpy.

Per sequence, `rate` of the non-special tokens are chosen (at least 1, at most
`max_predictions`); of those, 80% become [MASK], 10% a random regular token, 10% stay. With
`whole_word`, all pieces of a word are chosen together, as in BERT's whole-word masking.

Randomness comes from one numpy Generator per sequence, so what a sequence gets depends only on
its own seed: not on the batch it sits in, nor on how the batch is split across hosts.
"""

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxlm.data.tokenizer import MASK_ID, NUM_SPECIAL


@dataclasses.dataclass(frozen=True)
class MaskingOptions:
  rate: float = 0.15
  max_predictions: int = 20
  mask_token_prob: float = 0.8
  random_token_prob: float = 0.1
  whole_word: bool = False


def mask_tokens(
    input_ids_BL: np.ndarray,
    rngs: Sequence[np.random.Generator],
    options: MaskingOptions,
    *,
    vocab_size: int,
    word_start_V: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """Returns the corrupted `input_ids` and the `[B, max_predictions]` prediction targets.

  `vocab_size` is the tokenizer's (random replacements are drawn from its regular pieces);
  `word_start_V[id]` says whether a piece begins a word, needed for whole-word masking.
  """
  batch, length = input_ids_BL.shape
  p = options.max_predictions
  draws = np.stack([rng.random((3, length)) for rng in rngs], axis=1)  # [3, B, L]
  replacement_BL = np.stack([rng.integers(NUM_SPECIAL, vocab_size, length) for rng in rngs])
  choose_key_BL, action_BL, word_key_BL = draws

  candidate_BL = input_ids_BL >= NUM_SPECIAL
  n_candidates_B = candidate_BL.sum(axis=1)
  n_predict_B = np.minimum(p, np.maximum(1, np.round(n_candidates_B * options.rate))).astype(int)
  n_predict_B = np.minimum(n_predict_B, n_candidates_B)

  if options.whole_word:
    if word_start_V is None:
      raise ValueError("whole-word masking needs the tokenizer's word_start table")
    chosen_BL = _choose_whole_words(
        input_ids_BL, candidate_BL, word_start_V, word_key_BL, n_predict_B
    )
  else:
    key_BL = np.where(candidate_BL, choose_key_BL, np.inf)
    rank_BL = np.argsort(np.argsort(key_BL, axis=1, kind="stable"), axis=1, kind="stable")
    chosen_BL = rank_BL < n_predict_B[:, None]

  to_mask_BL = chosen_BL & (action_BL < options.mask_token_prob)
  to_random_BL = chosen_BL & ~to_mask_BL & (
      action_BL < options.mask_token_prob + options.random_token_prob
  )
  corrupted_BL = np.where(to_mask_BL, MASK_ID, input_ids_BL)
  corrupted_BL = np.where(to_random_BL, replacement_BL, corrupted_BL).astype(np.int32)

  # Chosen positions first, in order; then padding slots (position 0, weight 0).
  order_BL = np.argsort(~chosen_BL, axis=1, kind="stable")[:, :p]
  order_BL = np.pad(order_BL, ((0, 0), (0, p - order_BL.shape[1])))  # When seq_len < p.
  count_B = chosen_BL.sum(axis=1)
  weights_BP = np.arange(p)[None, :] < count_B[:, None]
  positions_BP = np.where(weights_BP, order_BL, 0).astype(np.int32)
  labels_BP = np.where(weights_BP, np.take_along_axis(input_ids_BL, positions_BP, 1), 0)
  return {
      "input_ids": corrupted_BL,
      "mlm_positions": positions_BP,
      "mlm_ids": labels_BP.astype(np.int32),
      "mlm_weights": weights_BP.astype(np.float32),
  }


def _choose_whole_words(input_ids_BL, candidate_BL, word_start_V, key_BL, n_predict_B):
  """Chooses whole words in random order while their pieces fit in `n_predict`.

  A word is a candidate piece that starts a word plus the continuation pieces after it. A word
  that would overflow the budget is skipped, as in BERT, and later (shorter) words still fit.
  """
  batch, length = input_ids_BL.shape
  starts_BL = candidate_BL & (
      word_start_V[input_ids_BL] | ~np.concatenate(
          [np.zeros((batch, 1), bool), candidate_BL[:, :-1]], axis=1)
  )
  word_BL = np.cumsum(starts_BL, axis=1) - 1  # Word index of each piece (-1 before the first).
  chosen_BL = np.zeros_like(candidate_BL)
  for b in range(batch):
    start_positions = np.flatnonzero(starts_BL[b])
    if not len(start_positions):
      continue
    word_of = word_BL[b][candidate_BL[b]]
    sizes = np.bincount(word_of, minlength=len(start_positions))
    budget = n_predict_B[b]
    chosen_words = np.zeros(len(start_positions), bool)
    for w in np.argsort(key_BL[b, start_positions], kind="stable"):
      if sizes[w] <= budget:
        chosen_words[w] = True
        budget -= sizes[w]
        if budget == 0:
          break
    chosen_BL[b] = candidate_BL[b] & chosen_words[np.maximum(word_BL[b], 0)]
  return chosen_BL
