"""BERT's masked-LM corruption: how many, which, and how the chosen tokens are replaced."""

import math

import numpy as np
import pytest

from jaxlm.data import masking, random
from jaxlm.data.masking import MaskingOptions, mask_tokens
from jaxlm.data.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID
from conftest import words_of

VOCAB = 1000
LENGTH = 128
BATCHES, ROWS = 64, 32


def _keys(seeds):
  return random.row_keys(7, np.asarray(seeds))


def _bert_rows(rng, rows=ROWS, length=LENGTH, vocab=VOCAB):
  """[CLS] A [SEP] B [SEP] then PAD, with random regular ids and random lengths."""
  ids = rng.integers(NUM_SPECIAL, vocab, (rows, length)).astype(np.int32)
  for r in range(rows):
    n = int(rng.integers(6, length + 1))
    sep = int(rng.integers(2, n - 2))
    ids[r, 0], ids[r, sep], ids[r, n - 1] = CLS_ID, SEP_ID, SEP_ID
    ids[r, n:] = PAD_ID
  return ids


@pytest.fixture(scope="module")
def draws():
  """64 batches of 32 rows, masked with BERT's defaults: (inputs, outputs) per batch."""
  rng = np.random.default_rng(0)
  out = []
  for b in range(BATCHES):
    ids = _bert_rows(rng)
    # A few rows that are short, so that max(1, ...) and min(count, ...) matter.
    ids[0, 4:] = PAD_ID
    ids[1, 2:] = PAD_ID  # [CLS] and one regular token.
    out.append((ids, mask_tokens(ids, _keys(range(b * ROWS, (b + 1) * ROWS)), MaskingOptions(),
                                 vocab_size=VOCAB)))
  return out


def _chosen(ids, out):
  """[B, L] bool of the chosen positions, from the prediction slots."""
  chosen = np.zeros(ids.shape, bool)
  rows, slots = np.nonzero(out["mlm_weights"])
  chosen[rows, out["mlm_positions"][rows, slots]] = True
  return chosen


def test_shapes_and_dtypes(draws):
  ids, out = draws[0]
  p = MaskingOptions().max_predictions
  assert out["input_ids"].shape == ids.shape and out["input_ids"].dtype == np.int32
  for key in ("mlm_positions", "mlm_ids"):
    assert out[key].shape == (ROWS, p) and out[key].dtype == np.int32
  assert out["mlm_weights"].shape == (ROWS, p) and out["mlm_weights"].dtype == np.float32
  assert set(np.unique(out["mlm_weights"])) <= {0.0, 1.0}


def test_prediction_count_per_row(draws):
  options = MaskingOptions()
  for ids, out in draws:
    candidates = (ids >= NUM_SPECIAL).sum(axis=1)
    want = np.array([min(options.max_predictions, max(1, round(options.rate * n)), n)
                     for n in candidates])
    np.testing.assert_array_equal(out["mlm_weights"].sum(axis=1), want)
    # The weighted slots come first, then padding slots only.
    w = out["mlm_weights"]
    assert (np.diff(w, axis=1) <= 0).all()


def test_only_regular_tokens_are_chosen_once_each(draws):
  for ids, out in draws:
    w = out["mlm_weights"] > 0
    for r in range(ROWS):
      positions = out["mlm_positions"][r][w[r]]
      assert len(set(positions.tolist())) == len(positions)
      assert (np.diff(positions) > 0).all()  # In order along the sequence.
      assert (ids[r, positions] >= NUM_SPECIAL).all()


def test_targets_are_the_original_tokens(draws):
  for ids, out in draws:
    w = out["mlm_weights"] > 0
    originals = np.take_along_axis(ids, out["mlm_positions"], axis=1)
    np.testing.assert_array_equal(out["mlm_ids"][w], originals[w])
    # Padding slots: position 0, label 0.
    assert (out["mlm_positions"][~w] == 0).all() and (out["mlm_ids"][~w] == 0).all()


def test_unchosen_positions_are_untouched(draws):
  for ids, out in draws:
    chosen = _chosen(ids, out)
    np.testing.assert_array_equal(out["input_ids"][~chosen], ids[~chosen])
    specials = ids < NUM_SPECIAL
    np.testing.assert_array_equal(out["input_ids"][specials], ids[specials])


def _within(count, total, p, sigmas=4.0):
  std = math.sqrt(total * p * (1 - p))
  return abs(count - total * p) <= sigmas * std + 1


def test_replacement_split_is_80_10_10(draws):
  options = MaskingOptions()
  masked = random = kept = total = 0
  for ids, out in draws:
    chosen = _chosen(ids, out)
    before, after = ids[chosen], out["input_ids"][chosen]
    total += chosen.sum()
    masked += (after == MASK_ID).sum()
    random += ((after != MASK_ID) & (after != before)).sum()
    kept += (after == before).sum()
    replaced = after[after != MASK_ID]
    assert ((replaced >= NUM_SPECIAL) & (replaced < VOCAB)).all()
  assert total > 15_000
  # A random replacement equals the original with probability 1 / (VOCAB - NUM_SPECIAL).
  same = options.random_token_prob / (VOCAB - NUM_SPECIAL)
  assert _within(masked, total, options.mask_token_prob), masked / total
  assert _within(random, total, options.random_token_prob - same), random / total
  assert _within(kept, total, 1 - options.mask_token_prob - options.random_token_prob + same), (
      kept / total)


def test_random_replacements_are_uniform_over_regular_ids():
  ids = np.full((4096, 64), 5, np.int32)
  options = MaskingOptions(mask_token_prob=0.0, random_token_prob=1.0, max_predictions=10)
  out = mask_tokens(ids, _keys(range(4096)), options, vocab_size=16)
  chosen = _chosen(ids, out)
  values = out["input_ids"][chosen]
  counts = np.bincount(values, minlength=16)
  assert counts[:NUM_SPECIAL].sum() == 0
  n, p = len(values), 1 / (16 - NUM_SPECIAL)
  for v in range(NUM_SPECIAL, 16):
    assert _within(counts[v], n, p, sigmas=5), (v, counts)


def test_random_replacements_are_independent_of_the_action():
  """With the default split, the 10% random tokens are still uniform over regular ids: the
  replacement draw is not the action draw in disguise."""
  ids = np.full((4096, 64), 5, np.int32)
  options = MaskingOptions(max_predictions=10)
  out = mask_tokens(ids, _keys(range(4096)), options, vocab_size=16)
  values = out["input_ids"][_chosen(ids, out)]
  values = values[values != MASK_ID]  # Random replacements, and kept tokens (5).
  counts = np.bincount(values, minlength=16)
  chosen, p = int((out["mlm_weights"] > 0).sum()), options.random_token_prob / (16 - NUM_SPECIAL)
  for v in range(NUM_SPECIAL, 16):
    if v != 5:
      assert _within(counts[v], chosen, p, sigmas=5), (v, counts)


def test_custom_split_is_respected():
  ids = np.random.default_rng(1).integers(NUM_SPECIAL, VOCAB, (512, LENGTH)).astype(np.int32)
  options = MaskingOptions(rate=0.5, max_predictions=64, mask_token_prob=0.3,
                           random_token_prob=0.6)
  out = mask_tokens(ids, _keys(range(512)), options, vocab_size=VOCAB)
  assert (out["mlm_weights"].sum(axis=1) == 64).all()
  chosen = _chosen(ids, out)
  after, before = out["input_ids"][chosen], ids[chosen]
  total = chosen.sum()
  assert _within((after == MASK_ID).sum(), total, 0.3)
  assert _within((after == before).sum(), total, 0.1 + 0.6 / (VOCAB - NUM_SPECIAL))


def test_rows_with_only_special_tokens_get_no_prediction():
  ids = np.array([[CLS_ID, SEP_ID, SEP_ID] + [PAD_ID] * 29, [PAD_ID] * 32], np.int32)
  out = mask_tokens(ids, _keys([1, 2]), MaskingOptions(), vocab_size=VOCAB)
  assert out["mlm_weights"].sum() == 0
  np.testing.assert_array_equal(out["input_ids"], ids)


def test_sequences_shorter_than_max_predictions():
  """data.seq_len may be as low as 8 while max_predictions_per_seq defaults to 20."""
  ids = np.full((3, 16), 9, np.int32)
  ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
  ids[2, 5:] = PAD_ID
  out = mask_tokens(ids, _keys([1, 2, 3]), MaskingOptions(rate=0.5), vocab_size=VOCAB)
  assert out["mlm_positions"].shape == (3, 20)
  np.testing.assert_array_equal(out["mlm_weights"].sum(axis=1), [7, 7, 2])
  assert (out["mlm_ids"][out["mlm_weights"] > 0] == 9).all()


def test_each_position_is_chosen_about_equally_often():
  rows, length = 4096, 64
  ids = np.random.default_rng(2).integers(NUM_SPECIAL, VOCAB, (rows, length)).astype(np.int32)
  options = MaskingOptions()
  out = mask_tokens(ids, _keys(range(rows)), options, vocab_size=VOCAB)
  counts = _chosen(ids, out).sum(axis=0)
  per_row = round(options.rate * length)
  assert counts.sum() == rows * per_row
  p = per_row / length
  std = math.sqrt(rows * p * (1 - p))
  assert np.abs(counts - rows * p).max() < 5 * std, counts
  # No drift along the sequence: the first and the second half are chosen equally often.
  half = counts[: length // 2].sum() - counts[length // 2:].sum()
  assert abs(half) < 5 * std * math.sqrt(length), counts


def test_same_seeds_give_same_masks_and_other_seeds_differ():
  ids = _bert_rows(np.random.default_rng(3))
  a = mask_tokens(ids, _keys(range(ROWS)), MaskingOptions(), vocab_size=VOCAB)
  b = mask_tokens(ids, _keys(range(ROWS)), MaskingOptions(), vocab_size=VOCAB)
  c = mask_tokens(ids, _keys(range(100, 100 + ROWS)), MaskingOptions(), vocab_size=VOCAB)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["mlm_positions"], c["mlm_positions"])


@pytest.mark.parametrize("whole_word", [False, True])
def test_a_row_depends_only_on_its_own_key(whole_word):
  ids = _bert_rows(np.random.default_rng(4))
  ids[5, 3:] = PAD_ID  # A short row: the whole-word path pads words to the batch's longest row.
  options = MaskingOptions(whole_word=whole_word)
  word_start = (np.arange(VOCAB) < NUM_SPECIAL) | (np.arange(VOCAB) % 4 == 0)

  def mask(rows, seeds):
    return mask_tokens(ids[rows], _keys(seeds), options, vocab_size=VOCAB,
                       word_start_V=word_start)

  seeds = np.arange(ROWS)
  whole = mask(seeds, seeds)
  order = np.random.default_rng(5).permutation(ROWS)
  shuffled = mask(order, seeds[order])
  for key in whole:
    np.testing.assert_array_equal(shuffled[key], whole[key][order])
  # A smaller batch (as on one of several hosts) gives those rows the same masks.
  for part in (np.arange(8, 12), np.array([5]), np.array([5, 30])):
    out = mask(part, seeds[part])
    for key in whole:
      np.testing.assert_array_equal(out[key], whole[key][part])
  # The key decides: the same tokens under two keys are masked differently.
  swapped = mask_tokens(ids[[3, 3]], _keys([3, 9]), options, vocab_size=VOCAB,
                        word_start_V=word_start)
  assert not np.array_equal(swapped["mlm_positions"][0], swapped["mlm_positions"][1])


def test_pieces_are_the_candidates_of_smallest_key():
  """The exact rule: a row's `n_predict` candidates with the smallest choice draws."""
  ids = _bert_rows(np.random.default_rng(9), rows=256)
  keys = _keys(range(256))
  options = MaskingOptions()
  out = mask_tokens(ids, keys, options, vocab_size=VOCAB)
  draw = random.uniform(keys, masking._CHOOSE_DRAW, (LENGTH,))
  for r in range(len(ids)):
    candidates = np.flatnonzero(ids[r] >= NUM_SPECIAL)
    n = min(options.max_predictions, max(1, round(options.rate * len(candidates))),
            len(candidates))
    want = np.sort(candidates[np.argsort(draw[r, candidates])[:n]])
    got = out["mlm_positions"][r][out["mlm_weights"][r] > 0]
    np.testing.assert_array_equal(got, want)


# Whole-word masking. A hand-made table: regular ids divisible by 4 begin a word.
WW_VOCAB = 64
WORD_START = np.array([i < NUM_SPECIAL or i % 4 == 0 for i in range(WW_VOCAB)])


def _words(row):
  return words_of(row, WORD_START)


@pytest.mark.parametrize("max_predictions", [20, 5])
def test_whole_word_masking_chooses_whole_words_within_budget(max_predictions):
  rng = np.random.default_rng(6)
  ids = _bert_rows(rng, rows=256, length=96, vocab=WW_VOCAB)
  options = MaskingOptions(max_predictions=max_predictions, whole_word=True)
  out = mask_tokens(ids, _keys(range(256)), options, vocab_size=WW_VOCAB, word_start_V=WORD_START)
  chosen = _chosen(ids, out)
  counts = chosen.sum(axis=1)
  assert (counts <= max_predictions).all()
  np.testing.assert_array_equal(out["mlm_weights"].sum(axis=1), counts)
  multi_piece_words_chosen = 0
  for r in range(len(ids)):
    n = int((ids[r] >= NUM_SPECIAL).sum())
    budget = min(max_predictions, max(1, round(options.rate * n)), n)
    assert counts[r] <= budget
    words = _words(ids[r])
    assert sum(map(len, words)) == n
    left = budget - counts[r]
    for word in words:
      picked = chosen[r, word]
      assert picked.all() or not picked.any(), (r, word, ids[r, word], picked)
      if picked.all():
        multi_piece_words_chosen += len(word) > 1
      else:  # Greedy filling: a word was left out only because it did not fit.
        assert len(word) > left, (r, word, left)
    np.testing.assert_array_equal(out["mlm_ids"][r, :counts[r]], ids[r][chosen[r]])
  assert multi_piece_words_chosen > 50
  # Per-piece masking on the same rows splits words; whole-word masking never does.
  pieces = mask_tokens(ids, _keys(range(256)), MaskingOptions(max_predictions=max_predictions),
                       vocab_size=WW_VOCAB)
  split = 0
  for r in range(len(ids)):
    piece_chosen = _chosen(ids, pieces)[r]
    split += sum(0 < piece_chosen[w].sum() < len(w) for w in _words(ids[r]))
  assert split > 0


def test_whole_word_masking_matches_a_per_row_reference():
  """The vectorised greedy fill against the plain one: words in order of their first piece's
  choice draw, each taken if it fits in what is left of the budget."""
  ids = _bert_rows(np.random.default_rng(10), rows=300, length=64, vocab=WW_VOCAB)
  ids[0, 2:] = PAD_ID
  ids[1] = PAD_ID
  keys = _keys(range(300))
  for max_predictions in (20, 3):
    options = MaskingOptions(max_predictions=max_predictions, whole_word=True)
    out = mask_tokens(ids, keys, options, vocab_size=WW_VOCAB, word_start_V=WORD_START)
    draw = random.uniform(keys, masking._CHOOSE_DRAW, (64,))
    for r in range(len(ids)):
      words = _words(ids[r])
      n = sum(map(len, words))
      budget = min(max_predictions, max(1, round(options.rate * n)), n)
      want = []
      for w in sorted(words, key=lambda word: draw[r, word[0]]):
        if len(w) <= budget:
          want += w
          budget -= len(w)
      got = out["mlm_positions"][r][out["mlm_weights"][r] > 0]
      np.testing.assert_array_equal(got, sorted(want), err_msg=f"row {r}")


def test_whole_word_masking_needs_the_table():
  ids = _bert_rows(np.random.default_rng(8), rows=2)
  with pytest.raises(ValueError, match="word_start"):
    mask_tokens(ids, _keys([0, 1]), MaskingOptions(whole_word=True), vocab_size=VOCAB)
