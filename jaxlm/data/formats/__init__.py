"""Example formats: how a prepared split becomes fixed-length sequences, computed from indices.

Each format maps an example index (within one pass over the split) and a per-example random key
to one row, without ever building the pass: `pairs` (BERT segment pairs with NSP labels),
`full_sentences` (RoBERTa) and `packed` (causal and permutation LMs). Formats know no objective.
`packed_pairs.PackedPairs` lays several `pairs` side by side in one training row
(`data.pack_examples`).
"""

from jaxlm.data.formats.base import FORMATS, Format, make_format
from jaxlm.data.formats import full_sentences, packed, pairs  # noqa: F401  (registers them)

__all__ = ["FORMATS", "Format", "make_format"]
