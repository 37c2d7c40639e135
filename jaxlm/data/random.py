"""Counter-based random numbers for the host pipeline, vectorised over rows (numpy only).

A numpy Generator per example costs tens of microseconds to build, which caps a 1024-row
pipeline near 2 M tokens/s. Here every number is a hash instead: a row's key is a hash of
(seed, counters...), e.g. (seed, stream, step, row in the global batch), and element j of draw d
is a hash of (key, d, j). What a row gets therefore depends only on its own key, never on the
batch it sits in or on how rows are split across hosts, and a whole batch costs a few array ops.

The hash is splitmix64's finaliser (Stafford's "mix13"), on uint64 with wrap-around arithmetic;
a row's stream is exactly SplitMix64 seeded by its per-draw key, which passes BigCrush.
"""

import functools
import math
import zlib

import numpy as np

_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: splitmix64's increment.
_MUL1, _MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SEED_OFFSET = 0x2545F4914F6CDD1D  # Separates a seed from a counter of equal value.
_DRAW_OFFSET = 0x3C6EF372FE94F82B  # Separates draw numbers from counters.
_U_MUL1, _U_MUL2 = np.uint64(_MUL1), np.uint64(_MUL2)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_CHUNK = 8192  # uint64 elements hashed at a time (64 KiB), see `uniform`.


def _mix_int(z: int) -> int:
  """splitmix64's finaliser on a Python int (scalars: cheaper than a 0-d array)."""
  z &= _MASK64
  z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
  z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
  return z ^ (z >> 31)


def _mix(z: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
  """splitmix64's finaliser, a bijection of uint64 with full avalanche, in place on `z`.

  Works in place with one scratch buffer of z's size (fresh temporaries for each shift would
  cost allocations). uint64 array arithmetic wraps around silently.
  """
  if scratch is None:
    scratch = np.empty_like(z)
  np.right_shift(z, _S30, out=scratch)
  z ^= scratch
  z *= _U_MUL1
  np.right_shift(z, _S27, out=scratch)
  z ^= scratch
  z *= _U_MUL2
  np.right_shift(z, _S31, out=scratch)
  z ^= scratch
  return z


def _as_uint64(value: int | np.ndarray, what: str) -> np.ndarray:
  """A fresh uint64 array (so `_mix` may work in place) from non-negative integers."""
  array = np.asarray(value)
  if array.dtype == np.uint64:
    return array.copy()
  if array.dtype == object or not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
    raise TypeError(f"{what} must be integers, got dtype {array.dtype}")
  if array.size and np.issubdtype(array.dtype, np.signedinteger) and array.min() < 0:
    raise ValueError(f"{what} must be non-negative, got {array.min()}")
  return array.astype(np.uint64)


def row_keys(seed: int, *counters: int | np.ndarray) -> np.ndarray:
  """One uint64 key per row: the seed and then each counter, in turn, mixed into a running hash.

  Counters broadcast against each other, e.g. `row_keys(seed, stream, step, rows_B)` -> [B].
  All values are non-negative integers below 2**63. Order matters: (1, 2) and (2, 1) differ.
  """
  h = _as_uint64(seed, "seed")  # Checks it; the hash itself runs on Python ints while scalar.
  h = _mix_int(int(h) + _SEED_OFFSET) if h.ndim == 0 else _mix(h + np.uint64(_SEED_OFFSET))
  for counter in counters:
    # Counters are mixed before they meet the running hash, so small neighbouring counters
    # (rows 0, 1, 2...) differ in every bit, not only in the low ones.
    c = _as_uint64(counter, "counters")
    if c.ndim == 0:
      c = _mix_int(int(c) + _GOLDEN)
    else:
      c += np.uint64(_GOLDEN)
      c = _mix(c)
    if isinstance(h, int) and isinstance(c, int):
      h = _mix_int(h ^ c)
    else:
      h = _mix(np.asarray(h, np.uint64) ^ np.asarray(c, np.uint64))
  return np.asarray(h, np.uint64)


@functools.lru_cache(maxsize=64)
def _offsets(n: int) -> np.ndarray:
  """(j + 1) * golden for j < n: the SplitMix64 states after a row's key, read-only."""
  offsets = np.arange(1, n + 1, dtype=np.uint64)
  offsets *= np.uint64(_GOLDEN)
  offsets.flags.writeable = False
  return offsets


def uniform(keys: np.ndarray, draw: int, shape_tail: tuple[int, ...]) -> np.ndarray:
  """float64 in [0, 1), of shape keys.shape + shape_tail, 53 random bits each.

  Element j (in C order over shape_tail) of row b is a hash of (keys[b], draw, j): so a row's
  numbers depend on its key alone. `draw` separates independent streams of the same key.
  Precisely: mix(k_b + (j + 1) * golden) >> 11, over 2**53, where k_b = mix(keys[b] ^ mix(draw
  + offset)): the row's SplitMix64 stream, seeded with k_b.
  """
  keys = np.asarray(keys)
  n = math.prod(shape_tail)
  if draw < 0:
    raise ValueError(f"draw must be non-negative, got {draw}")
  k = _as_uint64(keys, "keys").reshape(-1)
  k ^= np.uint64(_mix_int(draw + _DRAW_OFFSET))
  k = _mix(k)
  offsets = _offsets(n)
  out = np.empty((k.size, n), np.float64)
  # Hashed a block at a time in two small buffers, straight into `out`: [B, n]-sized
  # temporaries can cost more in page faults than the hashing (glibc gives blocks over 128 KiB
  # fresh pages), and the blocks stay in cache.
  cols_per_block = max(1, min(n, _CHUNK))
  rows_per_block = max(1, _CHUNK // cols_per_block)
  work = np.empty((min(rows_per_block, k.size), min(cols_per_block, n)), np.uint64)
  scratch = np.empty_like(work)
  for r in range(0, k.size, rows_per_block):
    rows = slice(r, r + rows_per_block)
    for c in range(0, n, cols_per_block):
      cols = slice(c, c + cols_per_block)
      shape = (len(k[rows]), len(offsets[cols]))
      block, tmp = work[:shape[0], :shape[1]], scratch[:shape[0], :shape[1]]
      np.add(k[rows, None], offsets[cols], out=block)
      _mix(block, tmp)
      block >>= _S11
      np.multiply(block, 2.0**-53, out=out[rows, cols])
  return out.reshape(keys.shape + tuple(shape_tail))


def integers(
    keys: np.ndarray,
    draw: int,
    low: int,
    high: int | np.ndarray,
    shape_tail: tuple[int, ...],
) -> np.ndarray:
  """int64 in [low, high), of shape keys.shape + shape_tail, from `uniform(keys, draw, ...)`.

  `high` broadcasts against keys.shape + shape_tail by numpy's rules: give a per-row bound as
  `high_B[:, None]` when shape_tail is not empty. Every high must exceed low. Ranges above 2**53
  are slightly biased (one float64 draw per number).
  """
  span = np.asarray(high, dtype=np.int64) - np.int64(low)
  if span.size and span.min() <= 0:
    raise ValueError(f"integers needs high > low, got low={low}, high={high}")
  u = uniform(keys, draw, shape_tail)
  # floor(u * span) < span in exact arithmetic; float rounding may reach it for spans > 2**53.
  value = np.minimum((u * span).astype(np.int64), span - 1)
  value += np.int64(low)
  return value


def salt(name: str) -> int:
  """A stable int from a string, to derive per-transform keys: `row_keys(int(k), salt("mlm"))`.

  crc32, unlike Python's `hash`, does not change between processes.
  """
  return zlib.crc32(name.encode("utf-8"))


class IndexPermutation:
  """A pseudo-random bijection of range(n), keyed by a seed, evaluated lazily on index arrays.

  For a global shuffle of billions of examples without an array of size n: a balanced Feistel
  network on the smallest power-of-two domain with an even number of bits that holds n, with
  cycle-walking (apply again while the value is >= n, which stays a bijection of range(n)). The
  domain is at most 4n, so fewer than 4 walks are needed on average.
  """

  rounds = 6  # Luby-Rackoff needs 4 for a pseudo-random permutation; 2 more for small domains.

  def __init__(self, n: int, seed: int):
    if not 1 <= n <= 2**62:
      raise ValueError(f"IndexPermutation needs 1 <= n <= 2**62, got {n}")
    self.n = int(n)
    self.seed = int(seed)
    self._half_bits = max(1, ((self.n - 1).bit_length() + 1) // 2)  # 4**half_bits >= n.
    self._half = np.uint64(self._half_bits)
    self._half_mask = np.uint64((1 << self._half_bits) - 1)
    self._out_shift = np.uint64(64 - self._half_bits)
    self._round_keys = [np.uint64(row_keys(self.seed, r)) for r in range(self.rounds)]

  def _feistel(self, x: np.ndarray) -> np.ndarray:
    """One pass of the network over the whole 2**(2 * half_bits) domain (uint64 in, out)."""
    left, right = x >> self._half, x & self._half_mask
    for key in self._round_keys:
      # Round function: the high bits of a hash of (round key, right half).
      f = right * np.uint64(_GOLDEN)
      f += key
      f = _mix(f) >> self._out_shift
      f ^= left
      left, right = right, f
    return (left << self._half) | right

  def __call__(self, indices: np.ndarray) -> np.ndarray:
    """The images of `indices` (any shape and order, each in range(n)), as int64."""
    indices = np.asarray(indices)
    flat = _as_uint64(indices, "indices").reshape(-1)
    if flat.size and flat.max() >= self.n:
      raise ValueError(f"indices must be below n={self.n}, got {flat.max()}")
    out = self._feistel(flat)
    walking = np.flatnonzero(out >= self.n)
    while walking.size:
      out[walking] = self._feistel(out[walking])
      walking = walking[out[walking] >= self.n]
    return out.astype(np.int64).reshape(indices.shape)
