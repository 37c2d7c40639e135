"""The format interface, its registry, and the sentence-aligned window arithmetic they share."""

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from jaxlm.data.shards import Split
from jaxlm.errors import UserError

Batch = dict[str, np.ndarray]
FORMATS: dict[str, type["Format"]] = {}


class Format(abc.ABC):
  """A split seen as `len(self)` examples of `seq_len` tokens; row i is a function of (i, key)."""

  name: ClassVar[str]
  # Keys of the rows besides input_ids / token_type_ids, with their value on a padding row.
  extra_fields: ClassVar[Mapping[str, int]] = {}

  def __init__(self, split: Split, seq_len: int):
    if seq_len < 8:
      raise UserError(f"data.seq_len is {seq_len}; examples need at least 8 positions.")
    if split.num_tokens == 0:
      raise UserError(f"The {split.name} split of the prepared data is empty: there is no text "
                      "to build examples from. Use more text or another eval_fraction.")
    self.split, self.seq_len = split, seq_len

  @abc.abstractmethod
  def __len__(self) -> int:
    """Examples in one pass over the split."""

  @abc.abstractmethod
  def examples(self, indices: np.ndarray, keys: np.ndarray) -> Batch:
    """Rows for example `indices` (< len(self)), with one uint64 random key per row."""

  def padding(self, rows: int) -> Batch:
    """Rows that carry nothing (to fill the last eval batch); objectives give them weight 0."""
    out = {"input_ids": np.zeros((rows, self.seq_len), np.int32),
           "token_type_ids": np.zeros((rows, self.seq_len), np.int32)}
    out.update({k: np.full(rows, v, np.int32) for k, v in self.extra_fields.items()})
    return out


def register(cls: type[Format]) -> type[Format]:
  FORMATS[cls.name] = cls
  return cls


def make_format(name: str, split: Split, seq_len: int, **options: Any) -> Format:
  if name not in FORMATS:
    raise UserError(f"Unknown data.format '{name}'; use one of {sorted(FORMATS)}.")
  return FORMATS[name](split, seq_len, **options)


def window_starts(count: np.ndarray, length: np.ndarray, index: np.ndarray) -> np.ndarray:
  """Nominal start of window `index` of `count` spread evenly over `length` positions.

  floor(index x length / count) without forming index x length, which overflows int64 for a
  stream of tens of billions of tokens.
  """
  count = np.maximum(count, 1)
  quotient, remainder = np.divmod(length, count)
  return index * quotient + (index * remainder) // count


def slack_of(width: int) -> int:
  """How far back a window may move to start on a sentence: an eighth of its width.

  Windows are laid every `width - slack` positions and each may start up to `slack` earlier, at
  the sentence start found there; so every window holds at most `width` positions, windows tile
  the text exactly (nothing dropped, nothing repeated), and most begin at a sentence.
  """
  return max(1, width // 8)


def windows_for(length: np.ndarray, width: int) -> np.ndarray:
  """How many windows tile `length` positions so each spans at most `width - slack`."""
  stride = max(1, width - slack_of(width))
  return -(-np.asarray(length, np.int64) // stride)
