"""Counter-based random numbers: the exact hash, its statistics, per-row independence from the
batch, and the lazy index permutation."""

import math
import zlib

import numpy as np
import pytest

from jaxlm.data import random

MASK64 = 2**64 - 1
GOLDEN = 0x9E3779B97F4A7C15


def _mix(z: int) -> int:
  """splitmix64's finaliser on Python ints: the reference the vectorised code must match."""
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
  return z ^ (z >> 31)


def _row_key(seed, *counters):
  h = _mix((seed + 0x2545F4914F6CDD1D) & MASK64)
  for c in counters:
    h = _mix(h ^ _mix((c + GOLDEN) & MASK64))
  return h


def _uniform(key, draw, n):
  k = _mix(key ^ _mix((draw + 0x3C6EF372FE94F82B) & MASK64))
  return [(_mix((k + (j + 1) * GOLDEN) & MASK64) >> 11) / 2**53 for j in range(n)]


def _within(value, mean, std, sigmas=5.0):
  return abs(value - mean) <= sigmas * std


def test_reference_mix_is_splitmix64():
  # The first outputs of SplitMix64 seeded with 0 (Vigna's splitmix64.c).
  assert _mix(GOLDEN) == 0xE220A8397B1DCDAF
  assert _mix(2 * GOLDEN & MASK64) == 0x6E789E6AA1B965F4


def test_row_keys_and_uniform_match_the_reference_hash():
  counters = [(0,), (3,), (1, 2, 3), (2**63 - 1, 0, 5)]
  for seed in (0, 7, 2**62 + 1):
    for c in counters:
      assert int(random.row_keys(seed, *c)) == _row_key(seed, *c), (seed, c)
  keys = random.row_keys(11, np.arange(5))
  got = random.uniform(keys, 4, (6,))
  for b in range(5):
    np.testing.assert_array_equal(got[b], _uniform(int(keys[b]), 4, 6))


def test_row_keys_broadcast_and_types():
  keys = random.row_keys(1, 2, np.arange(5))
  assert keys.dtype == np.uint64 and keys.shape == (5,)
  grid = random.row_keys(1, np.arange(3)[:, None], np.arange(4))
  assert grid.shape == (3, 4)
  for i in range(3):
    for j in range(4):
      assert grid[i, j] == random.row_keys(1, i, j)
  # Arrays of any integer dtype give the same keys as Python ints.
  np.testing.assert_array_equal(random.row_keys(1, np.arange(4, dtype=np.int32)),
                                random.row_keys(1, np.arange(4, dtype=np.uint64)))
  with pytest.raises(ValueError, match="non-negative"):
    random.row_keys(1, np.array([0, -1]))
  with pytest.raises(TypeError, match="integers"):
    random.row_keys(1, np.array([0.5]))


def test_row_keys_are_distinct_and_avalanche():
  seeds, streams, steps, rows = np.meshgrid(
      np.arange(4), np.arange(3), np.arange(50), np.arange(200), indexing="ij")
  keys = random.row_keys(0, seeds, streams, steps, rows)
  assert len(np.unique(keys)) == keys.size
  # Which argument a value sits in matters.
  assert random.row_keys(1, 2) != random.row_keys(2, 1)
  assert random.row_keys(1, 2, 3) != random.row_keys(1, 3, 2)
  assert random.row_keys(5) != random.row_keys(5, 0)
  # Neighbouring rows differ in about half of their 64 bits.
  k = random.row_keys(3, 0, 0, np.arange(10_000))
  flipped = np.unpackbits((k[1:] ^ k[:-1]).view(np.uint8)).reshape(-1, 64).sum(axis=1)
  assert _within(flipped.mean(), 32, 4 / math.sqrt(len(flipped)))


def test_uniform_statistics():
  keys = random.row_keys(0, np.arange(1000))
  u = random.uniform(keys, 0, (1000,))
  assert u.shape == (1000, 1000) and u.dtype == np.float64
  assert u.min() >= 0.0 and u.max() < 1.0
  n = u.size
  assert _within(u.mean(), 0.5, math.sqrt(1 / 12 / n))
  # The sample variance's standard error: sqrt((mu4 - sigma**4) / n), mu4 = 1/80 for U(0, 1).
  assert _within(u.var(), 1 / 12, math.sqrt((1 / 80 - 1 / 144) / n))
  assert len(np.unique(u)) == n  # 53 bits: a collision among 1e6 draws has odds ~5e-5.
  # Flat over 1000 bins (chi-square with 999 degrees of freedom).
  counts = np.bincount((u * 1000).astype(int).ravel(), minlength=1000)
  chi2 = ((counts - n / 1000) ** 2 / (n / 1000)).sum()
  assert _within(chi2, 999, math.sqrt(2 * 999))
  # All 53 bits are random: the lowest one is set half of the time.
  low_bit = (u * 2.0**53).astype(np.int64) & 1
  assert _within(low_bit.mean(), 0.5, 0.5 / math.sqrt(n))
  # No correlation between neighbouring elements, rows or draws.
  std = 1 / math.sqrt(n)
  assert _within(np.corrcoef(u[:, 1:].ravel(), u[:, :-1].ravel())[0, 1], 0, std)
  assert _within(np.corrcoef(u[1:].ravel(), u[:-1].ravel())[0, 1], 0, std)
  other = random.uniform(keys, 1, (1000,))
  assert _within(np.corrcoef(u.ravel(), other.ravel())[0, 1], 0, std)


def test_rows_and_draws_differ():
  keys = random.row_keys(0, 0, np.arange(2000))
  u = random.uniform(keys, 0, (4,))
  assert len(np.unique(u, axis=0)) == len(keys)
  assert not np.isin(random.uniform(keys, 1, (4,)), u).any()
  np.testing.assert_array_equal(random.uniform(keys, 0, (4,)), u)  # Reproducible.


def test_a_row_depends_only_on_its_key():
  keys = random.row_keys(5, 1, np.arange(64))
  whole = random.uniform(keys, 3, (5, 4))
  assert whole.shape == (64, 5, 4)
  pick = np.array([40, 3, 3, 17])
  np.testing.assert_array_equal(random.uniform(keys[pick], 3, (5, 4)), whole[pick])
  np.testing.assert_array_equal(random.uniform(keys[9], 3, (5, 4)), whole[9])  # A scalar key.
  np.testing.assert_array_equal(random.uniform(keys.reshape(8, 8), 3, (5, 4)),
                                whole.reshape(8, 8, 5, 4))
  # Element j is a hash of (key, draw, j): the tail's shape only arranges the same numbers.
  np.testing.assert_array_equal(random.uniform(keys, 3, (20,)), whole.reshape(64, 20))
  np.testing.assert_array_equal(random.uniform(keys, 3, (7,)), whole.reshape(64, 20)[:, :7])


def test_integers_range_and_uniformity():
  keys = random.row_keys(2, np.arange(500))
  x = random.integers(keys, 0, 3, 10, (400,))
  assert x.dtype == np.int64 and x.shape == (500, 400)
  assert x.min() == 3 and x.max() == 9
  counts = np.bincount(x.ravel() - 3, minlength=7)
  n, p = x.size, 1 / 7
  for c in counts:
    assert _within(c, n * p, math.sqrt(n * p * (1 - p))), counts
  np.testing.assert_array_equal(x, 3 + (random.uniform(keys, 0, (400,)) * 7).astype(int))


def test_integers_with_a_bound_per_row():
  keys = random.row_keys(2, np.arange(6))
  high_B = np.array([1, 2, 3, 10, 100, 2**40])
  x = random.integers(keys, 5, 0, high_B[:, None], (3000,))
  assert x.shape == (6, 3000)
  assert (x >= 0).all() and (x < high_B[:, None]).all()
  for b in range(4):
    assert set(np.unique(x[b])) == set(range(high_B[b]))
  assert x[5].max() > 2**39  # The large bound is used, not clipped.
  # A per-row bound with no tail, and one row's numbers do not depend on the others' bounds.
  y = random.integers(keys, 5, 0, high_B, ())
  np.testing.assert_array_equal(y, x[:, 0])
  with pytest.raises(ValueError, match="high > low"):
    random.integers(keys, 0, 5, 5, (2,))


def test_salt_is_stable_and_separates_names():
  # Stable across processes and versions: data seeds of resumed runs depend on it.
  assert random.salt("mlm") == zlib.crc32(b"mlm") == 1158002735
  assert random.salt("mlm") != random.salt("plm")
  k = random.row_keys(1, 0)
  assert random.row_keys(int(k), random.salt("mlm")) != random.row_keys(int(k), random.salt("plm"))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 65537])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_index_permutation_is_a_bijection(n, seed):
  perm = random.IndexPermutation(n, seed)
  out = perm(np.arange(n))
  assert out.dtype == np.int64 and out.shape == (n,)
  np.testing.assert_array_equal(np.sort(out), np.arange(n))
  np.testing.assert_array_equal(random.IndexPermutation(n, seed)(np.arange(n)), out)
  if n >= 7:
    assert (out != np.arange(n)).mean() > 0.5  # Not (nearly) the identity.


def test_index_permutation_differs_between_seeds():
  a = random.IndexPermutation(1000, 0)(np.arange(1000))
  b = random.IndexPermutation(1000, 1)(np.arange(1000))
  assert (a != b).mean() > 0.95


def test_index_permutation_is_close_to_uniform():
  n, seeds = 10, 3000  # A domain of 16: most values walk the cycle at least once.
  images = np.array([random.IndexPermutation(n, s)(np.arange(n)) for s in range(seeds)])
  expected = seeds / n
  df_std = math.sqrt(2 * (n - 1))
  for where in (images[:, 0], np.argmin(images, axis=1), images[:, n - 1]):
    counts = np.bincount(where, minlength=n)  # Where 0 goes, what lands on 0, where 9 goes.
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert _within(chi2, n - 1, df_std), counts
  # Pairs: 0 and 1 land next to each other no more often than chance (2 / n).
  adjacent = (np.abs(images[:, 0] - images[:, 1]) == 1).mean()
  assert _within(adjacent, 2 * (n - 1) / (n * (n - 1)), math.sqrt(0.2 * 0.8 / seeds))


def test_index_permutation_on_index_arrays_in_any_order():
  perm = random.IndexPermutation(1000, 3)
  full = perm(np.arange(1000))
  order = np.random.default_rng(0).permutation(1000)
  np.testing.assert_array_equal(perm(order), full[order])
  grid = order[:24].reshape(2, 3, 4)
  np.testing.assert_array_equal(perm(grid), full[grid])
  np.testing.assert_array_equal(perm(np.array([5, 5, 5])), [full[5]] * 3)
  assert perm(np.array([], np.int64)).shape == (0,)
  assert perm(np.int64(7)) == full[7]
  with pytest.raises(ValueError, match="below n"):
    perm(np.array([1000]))
  with pytest.raises(ValueError, match="non-negative"):
    perm(np.array([-1]))


def test_index_permutation_of_a_huge_range_is_lazy():
  n = 10**15 + 7  # An array of size n would need 8 PB.
  perm = random.IndexPermutation(n, 9)
  idx = np.arange(0, n, n // 10_000)
  out = perm(idx)
  assert (out >= 0).all() and (out < n).all()
  assert len(np.unique(out)) == len(idx)
  assert _within(out.mean() / n, 0.5, math.sqrt(1 / 12 / len(idx)))
