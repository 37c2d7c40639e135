"""XLNet's factorisation orders: the slot layout, how many targets, which fillers, the local
permutation's blocks and uniformity, whole-word spans, and per-row determinism."""

import itertools
import math

import numpy as np
import pytest

from jaxlm.data import permutation, random
from jaxlm.data.permutation import (
  PermutationOptions,
  num_target_slots,
  sample_permutation,
)
from jaxlm.data.tokenizer import CLS_ID, NUM_SPECIAL, PAD_ID, SEP_ID
from conftest import words_of

VOCAB = 1000
# A synthetic word table: regular ids divisible by 3 begin a word (about 3 pieces a word).
WORD_START = np.arange(VOCAB) % 3 == 0


def _keys(seeds):
  return random.row_keys(7, np.asarray(seeds))


def _rows(rng, rows, length, min_length=3):
  """[CLS] A [SEP] B [SEP] then padding, with random regular ids and random lengths."""
  ids = rng.integers(NUM_SPECIAL, VOCAB, (rows, length)).astype(np.int32)
  n_B = rng.integers(min_length, length + 1, rows)
  ids[np.arange(length) >= n_B[:, None]] = PAD_ID
  ids[:, 0] = CLS_ID
  ids[np.arange(rows), rng.integers(1, n_B - 1)] = SEP_ID
  ids[np.arange(rows), n_B - 1] = SEP_ID
  return ids


def _goal(n_valid, k, p):
  """round(n_valid / K), half up, at least 1, at most P and n_valid."""
  return min(p, max(1, math.floor(n_valid / k + 0.5)), n_valid)


def _sections(out, r):
  """Row r's slots: (non-targets, fillers, real targets in order) as original positions."""
  perm, weights = out["plm_perm"][r], out["plm_target_weights"][r]
  length, p, k = len(perm), len(weights), int(weights.sum())
  return perm[:length - p], perm[length - p:length - k], perm[length - k:]


def _words(row):
  return words_of(row, WORD_START)


def test_num_target_slots():
  assert num_target_slots(512, 6) == 85  # XLNet's 512 / 6.
  assert num_target_slots(128, 6) == 21
  assert num_target_slots(15, 6) == 3  # 2.5 rounds up, like a row's own count.
  assert num_target_slots(3, 6) == 1
  assert num_target_slots(16, 1) == 16
  with pytest.raises(ValueError, match="partial_prediction"):
    num_target_slots(16, 0)


def test_bad_options_and_inputs_are_refused():
  for bad in ({"partial_prediction": 0}, {"perm_size": -1}, {"max_span_words": 0}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      PermutationOptions(**bad)
  ids = _rows(np.random.default_rng(0), 4, 16)
  with pytest.raises(ValueError, match="one key per row"):
    sample_permutation(ids, _keys(range(3)), PermutationOptions())
  with pytest.raises(ValueError, match="word_start"):
    sample_permutation(ids, _keys(range(4)), PermutationOptions(span_targets=True))


@pytest.mark.parametrize("span_targets,perm_size", [(False, 0), (False, 8), (True, 0), (True, 8)])
def test_slots_are_a_permutation_with_three_sections(span_targets, perm_size):
  ids = _rows(np.random.default_rng(1), 512, 64)
  ids[0] = PAD_ID
  ids[1, 2:] = PAD_ID  # [CLS] and one regular token.
  options = PermutationOptions(perm_size=perm_size, span_targets=span_targets)
  out = sample_permutation(ids, _keys(range(512)), options, word_start_V=WORD_START)
  p = num_target_slots(64, 6)
  assert out["plm_perm"].shape == (512, 64) and out["plm_perm"].dtype == np.int32
  assert out["plm_target_weights"].shape == (512, p)
  assert out["plm_target_weights"].dtype == np.float32
  np.testing.assert_array_equal(np.sort(out["plm_perm"], axis=1), np.tile(np.arange(64), (512, 1)))
  weights = out["plm_target_weights"]
  assert set(np.unique(weights)) <= {0.0, 1.0}
  assert (np.diff(weights, axis=1) >= 0).all()  # Fillers first, then the real targets.
  for r in range(len(ids)):
    rest, fillers, targets = _sections(out, r)
    assert (np.diff(rest) > 0).all() and (np.diff(fillers) > 0).all()
    assert (ids[r, targets] >= NUM_SPECIAL).all(), r
  assert weights[0].sum() == 0 and weights[1].sum() == 1


@pytest.mark.parametrize("k", [6, 4, 1])
def test_each_row_predicts_round_n_over_k(k):
  ids = _rows(np.random.default_rng(2), 1024, 96)
  ids[:8, 2:] = PAD_ID
  out = sample_permutation(ids, _keys(range(1024)), PermutationOptions(partial_prediction=k))
  p = num_target_slots(96, k)
  want = [_goal(int(n), k, p) for n in (ids >= NUM_SPECIAL).sum(axis=1)]
  np.testing.assert_array_equal(out["plm_target_weights"].sum(axis=1), want)


@pytest.mark.parametrize("k", [6, 4])
def test_share_of_predicted_tokens_is_one_in_k(k):
  ids = _rows(np.random.default_rng(3), 2048, 256, min_length=64)
  out = sample_permutation(ids, _keys(range(2048)), PermutationOptions(partial_prediction=k))
  share = out["plm_target_weights"].sum() / (ids >= NUM_SPECIAL).sum()
  assert abs(share * k - 1) < 0.01, share


def test_targets_and_order_match_a_per_row_reference():
  """The exact rule: the goal's valid positions of smallest choice draw are the targets, in
  order of (block, order draw); fillers are padding, then specials, then regular tokens, each
  by position; the rest, by position, come first."""
  length, perm_size, rows = 48, 16, 300
  ids = _rows(np.random.default_rng(4), rows, length)
  keys = _keys(range(rows))
  out = sample_permutation(ids, keys, PermutationOptions(perm_size=perm_size))
  choose = random.uniform(keys, permutation._CHOOSE_DRAW, (length,))
  order = random.uniform(keys, permutation._ORDER_DRAW, (length,))
  p = num_target_slots(length, 6)
  for r in range(rows):
    row = ids[r]
    valid = np.flatnonzero(row >= NUM_SPECIAL)
    targets = valid[np.argsort(choose[r, valid])[:_goal(len(valid), 6, p)]]
    ordered = sorted(targets, key=lambda i: (i // perm_size, order[r, i]))
    others = [i for i in range(length) if i not in set(targets)]
    kinds = sorted(others, key=lambda i: (row[i] != PAD_ID, row[i] >= NUM_SPECIAL, i))
    fillers = sorted(kinds[:p - len(targets)])
    rest = sorted(set(others) - set(fillers))
    np.testing.assert_array_equal(out["plm_perm"][r], rest + fillers + ordered, err_msg=f"row {r}")


def test_fillers_prefer_padding_then_special_tokens():
  length = 24  # P = 4.
  valid = np.arange(NUM_SPECIAL, NUM_SPECIAL + length)
  ids = np.tile(valid, (4, 1)).astype(np.int32)
  ids[0, 12:] = PAD_ID  # 10 regular: 2 targets; fillers: the first two pads.
  ids[0, 0], ids[0, 11] = CLS_ID, SEP_ID
  ids[1, [0, 11, 22, 23]] = [CLS_ID, SEP_ID, SEP_ID, SEP_ID]  # 20 regular: 3 targets, 1 filler.
  ids[2, [0, 11, 23]] = [CLS_ID, SEP_ID, PAD_ID]  # 21 regular: 4 targets, no filler.
  ids[3] = PAD_ID  # Nothing to predict: every target slot is a weight-0 pad.
  out = sample_permutation(ids, _keys(range(4)), PermutationOptions())
  np.testing.assert_array_equal(out["plm_target_weights"].sum(axis=1), [2, 3, 4, 0])
  np.testing.assert_array_equal(_sections(out, 0)[1], [12, 13])
  np.testing.assert_array_equal(_sections(out, 1)[1], [0])
  assert len(_sections(out, 2)[1]) == 0
  np.testing.assert_array_equal(_sections(out, 3)[1], [0, 1, 2, 3])
  # On random rows: a special filler only once every pad is one; no regular filler at all.
  ids = _rows(np.random.default_rng(5), 1024, 40)
  out = sample_permutation(ids, _keys(range(1024)), PermutationOptions(partial_prediction=3))
  specials_used = 0
  for r in range(len(ids)):
    fillers = _sections(out, r)[1]
    assert (ids[r, fillers] < NUM_SPECIAL).all()
    if (ids[r, fillers] != PAD_ID).any():
      specials_used += 1
      assert set(np.flatnonzero(ids[r] == PAD_ID)) <= set(fillers), r
  assert specials_used > 0


def test_a_row_short_of_whole_word_spans_fills_with_regular_tokens():
  """Words of two pieces and P = 3: spans reach 2 pieces, never the goal of 3 (a second word
  would pass P), and the free target slot takes the first regular non-target, with weight 0."""
  ids = np.tile([6, 7], (64, 9)).astype(np.int32)  # 6 begins a word, 7 continues it.
  out = sample_permutation(ids, _keys(range(64)), PermutationOptions(span_targets=True),
                           word_start_V=WORD_START)
  np.testing.assert_array_equal(out["plm_target_weights"], np.tile([0, 1, 1], (64, 1)))
  for r in range(len(ids)):
    _, fillers, targets = _sections(out, r)
    assert targets.min() % 2 == 0 and targets.max() == targets.min() + 1  # One whole word.
    np.testing.assert_array_equal(fillers, [0] if targets.min() else [2])


def test_local_permutation_is_block_major_and_uniform_within_blocks():
  """K = 1 makes every position a target, so the slots are the whole factorisation order."""
  rows, length, size = 4096, 16, 4
  ids = np.full((rows, length), 9, np.int32)
  out = sample_permutation(ids, _keys(range(rows)), PermutationOptions(partial_prediction=1,
                                                                       perm_size=size))
  perm = out["plm_perm"]
  assert (out["plm_target_weights"] == 1).all()
  np.testing.assert_array_equal(perm // size, np.tile(np.arange(length) // size, (rows, 1)))
  # Within a block, each of the 24 orders about equally often (5 sigma)...
  expected, std = rows / 24, math.sqrt(rows / 24 * (23 / 24))
  for block in range(length // size):
    codes = perm[:, block * size:(block + 1) * size] - block * size
    seen = {order: 0 for order in itertools.permutations(range(size))}
    for order in map(tuple, codes.tolist()):
      seen[order] += 1
    assert all(abs(n - expected) < 5 * std for n in seen.values()), (block, seen)
  # ... each pair's two relative orders about half the time, and blocks independent.
  where = np.argsort(perm, axis=1)  # Slot of each position.
  half, half_std = rows / 2, math.sqrt(rows / 4)
  for i, j in [(0, 1), (0, 3), (5, 6), (12, 15)]:
    assert abs((where[:, i] < where[:, j]).sum() - half) < 5 * half_std, (i, j)
  both = ((where[:, 0] < where[:, 1]) & (where[:, 4] < where[:, 5])).sum()
  assert abs(both - rows / 4) < 5 * math.sqrt(rows * 3 / 16)


@pytest.mark.parametrize("perm_size", [4, 5])
def test_real_targets_of_a_later_block_come_later(perm_size):
  length = 16
  ids = _rows(np.random.default_rng(6), 2048, length)
  out = sample_permutation(ids, _keys(range(2048)),
                           PermutationOptions(partial_prediction=2, perm_size=perm_size))
  crossings = 0
  for r in range(len(ids)):
    targets = _sections(out, r)[2]
    assert (np.diff(targets // perm_size) >= 0).all(), (r, targets)
    crossings += len(set(targets // perm_size)) > 1
  assert crossings > 1000  # The property was tested on rows with targets in several blocks.
  # One block (perm_size 0, or at least L): targets are out of position order in many rows.
  for size in (0, length):
    out = sample_permutation(ids, _keys(range(2048)),
                             PermutationOptions(partial_prediction=2, perm_size=size))
    unsorted = sum((np.diff(_sections(out, r)[2]) < 0).any() for r in range(len(ids)))
    assert unsorted > 1000


def test_first_target_is_uniform_over_valid_positions():
  rows, length, n_valid = 6000, 40, 30
  ids = np.full((rows, length), PAD_ID, np.int32)
  ids[:, 1:n_valid + 1] = np.random.default_rng(7).integers(NUM_SPECIAL, VOCAB, (rows, n_valid))
  ids[:, 0], ids[:, n_valid + 1] = CLS_ID, SEP_ID
  out = sample_permutation(ids, _keys(range(rows)), PermutationOptions())
  k = _goal(n_valid, 6, num_target_slots(length, 6))
  first = out["plm_perm"][:, length - k]
  counts = np.bincount(first, minlength=length)
  assert counts[0] == 0 and counts[n_valid + 1:].sum() == 0
  expected = rows / n_valid
  assert counts[1:n_valid + 1].max() < 2 * expected and counts[1:n_valid + 1].min() > expected / 2
  std = math.sqrt(expected * (1 - 1 / n_valid))
  assert np.abs(counts[1:n_valid + 1] - expected).max() < 5 * std, counts


@pytest.mark.parametrize("span_targets", [False, True])
def test_a_row_depends_only_on_its_own_key(span_targets):
  ids = _rows(np.random.default_rng(8), 32, 64)
  ids[5, 3:] = PAD_ID  # A short row: its batch's word count W is then another row's.
  options = PermutationOptions(perm_size=16, span_targets=span_targets)

  def sample(rows, seeds):
    return sample_permutation(ids[rows], _keys(seeds), options, word_start_V=WORD_START)

  seeds = np.arange(32)
  whole = sample(seeds, seeds)
  order = np.random.default_rng(9).permutation(32)
  shuffled = sample(order, seeds[order])
  for key in whole:
    np.testing.assert_array_equal(shuffled[key], whole[key][order])
  for part in (np.arange(8, 12), np.array([5]), np.array([5, 30])):
    out = sample(part, seeds[part])
    for key in whole:
      np.testing.assert_array_equal(out[key], whole[key][part])
  # The key decides: one row under many keys gets many orders (and, here, target sets).
  same = sample(np.full(16, 3), np.arange(100, 116))
  assert len({tuple(perm) for perm in same["plm_perm"].tolist()}) == 16


def test_span_targets_are_whole_words_of_several_words():
  ids = _rows(np.random.default_rng(10), 512, 128, min_length=8)
  keys = _keys(range(512))
  p = num_target_slots(128, 6)
  segment_words = {}
  for max_words in (5, 1):
    options = PermutationOptions(span_targets=True, max_span_words=max_words)
    out = sample_permutation(ids, keys, options, word_start_V=WORD_START)
    words_per_segment = []
    for r in range(len(ids)):
      targets = set(_sections(out, r)[2].tolist())
      words = _words(ids[r])
      goal = _goal(sum(map(len, words)), 6, p)
      assert goal <= len(targets) <= p, (r, goal, len(targets))
      # Past the goal by less than one word: the last span ends at the word that reached it.
      assert len(targets) - goal < max(map(len, words)), r
      run = 0
      for w, word in enumerate(words):
        picked = [i in targets for i in word]
        assert all(picked) or not any(picked), (r, word)
        if all(picked):
          run += 1
        if run and (not all(picked) or w + 1 == len(words) or words[w + 1][0] != word[-1] + 1):
          words_per_segment.append(run)  # A run of consecutive target words ended.
          run = 0
    segment_words[max_words] = np.asarray(words_per_segment)
  # Spans of several words: runs of target words longer and more often than single-word spans
  # give by adjacency alone (measured: 45% vs 17% of runs have 2+ words, 19% vs 2% have 3+).
  multi, single = segment_words[5], segment_words[1]
  assert (multi >= 2).mean() > 2 * (single >= 2).mean()
  assert (multi >= 3).mean() > 4 * (single >= 3).mean() and multi.max() >= 5


def test_span_lengths_are_one_over_n():
  u = (np.arange(200_000) + 0.5) / 200_000
  n = permutation._span_words(u, 5)
  harmonic = sum(1 / i for i in range(1, 6))
  np.testing.assert_allclose(np.bincount(n, minlength=6)[1:] / len(u),
                             [1 / (i * harmonic) for i in range(1, 6)], atol=1e-4)
  assert (permutation._span_words(u, 1) == 1).all()


def test_spans_match_a_per_row_reference():
  """The vectorised loop against the plain one: each word in order of its choice draw starts a
  span of its drawn length, cut at the run's end and once the goal is reached, and is taken
  when it overlaps no taken span and fits in P."""
  length, rows = 64, 300
  ids = _rows(np.random.default_rng(11), rows, length)
  ids[0, 2:] = PAD_ID
  ids[1] = PAD_ID
  keys = _keys(range(rows))
  for k, max_words in ((6, 5), (2, 3)):
    options = PermutationOptions(partial_prediction=k, span_targets=True, max_span_words=max_words)
    out = sample_permutation(ids, keys, options, word_start_V=WORD_START)
    p = num_target_slots(length, k)
    n_words = max(len(_words(row)) for row in ids)
    choose = random.uniform(keys, permutation._CHOOSE_DRAW, (n_words,))
    span_words = permutation._span_words(random.uniform(keys, permutation._SPAN_DRAW, (n_words,)),
                                         max_words)
    for r in range(rows):
      words = _words(ids[r])
      goal = _goal(sum(map(len, words)), k, p) if words else 0
      taken = set()
      for w in sorted(range(len(words)), key=lambda w: choose[r, w]):
        if len(taken) >= goal:
          break
        span = list(words[w])
        for nxt in words[w + 1:w + span_words[r, w]]:
          if len(span) >= goal - len(taken) or nxt[0] != span[-1] + 1:
            break
          span += nxt
        if not taken & set(span) and len(taken) + len(span) <= p:
          taken |= set(span)
      np.testing.assert_array_equal(np.sort(_sections(out, r)[2]), sorted(taken),
                                    err_msg=f"row {r}")
