"""BERT segment pairs (jaxlm.data.examples) and the deterministic, host-sharded loader."""

import math

import numpy as np
import pytest

from jaxlm.data import loader as loader_lib
from jaxlm.data.examples import build_pairs
from jaxlm.data.masking import MaskingOptions, mask_tokens
from jaxlm.data.tokenizer import CLS_ID, NUM_SPECIAL, PAD_ID, SEP_ID

SEQ_LEN = 64
_DOC_STRIDE = 100_000  # Synthetic token = NUM_SPECIAL + doc * _DOC_STRIDE + position in doc.


def _synthetic_documents(rng, n_docs=40, segments=(2, 30), segment_len=(1, 25)):
  """Documents whose tokens say where they come from: (document, running position)."""
  documents = []
  for d in range(n_docs):
    position, document = 0, []
    for _ in range(int(rng.integers(*segments))):
      n = int(rng.integers(*segment_len))
      document.append((NUM_SPECIAL + d * _DOC_STRIDE + np.arange(position, position + n))
                      .astype(np.int32))
      position += n
    documents.append(document)
  return documents


def _where(tokens):
  tokens = np.asarray(tokens, np.int64) - NUM_SPECIAL
  return tokens // _DOC_STRIDE, tokens % _DOC_STRIDE


def _segments(row, types):
  """Splits `[CLS] A [SEP] B [SEP] PAD...` into A and B, checking the layout on the way."""
  n = int((row != PAD_ID).sum())
  assert (row[n:] == PAD_ID).all(), "padding only at the end"
  assert row[0] == CLS_ID and row[n - 1] == SEP_ID
  seps = np.flatnonzero(row[:n] == SEP_ID)
  assert len(seps) == 2, row[:n]
  first = int(seps[0])
  assert not np.isin(row[1:first], [CLS_ID, PAD_ID]).any()
  np.testing.assert_array_equal(types[: first + 1], 0)
  np.testing.assert_array_equal(types[first + 1: n], 1)
  np.testing.assert_array_equal(types[n:], 0)
  return row[1:first], row[first + 1: n - 1]


@pytest.fixture(scope="module")
def synthetic():
  return _synthetic_documents(np.random.default_rng(0))


@pytest.fixture(scope="module")
def pairs(synthetic):
  return build_pairs(synthetic, seq_len=SEQ_LEN, short_seq_prob=0.1, random_next_prob=0.5,
                     rng=np.random.default_rng(1))


def test_layout_of_every_example(pairs):
  assert pairs.input_ids.shape == pairs.token_type_ids.shape == (len(pairs), SEQ_LEN)
  assert pairs.input_ids.dtype == pairs.token_type_ids.dtype == np.int32
  assert set(np.unique(pairs.next_sentence_label)) == {0, 1}
  for row, types in zip(pairs.input_ids, pairs.token_type_ids):
    a, b = _segments(row, types)
    assert len(a) >= 1 and len(b) >= 1
    assert len(a) + len(b) + 3 <= SEQ_LEN


def test_actual_next_segment_follows_a_in_its_document(pairs):
  checked = exact = 0
  for i in np.flatnonzero(pairs.next_sentence_label == 0):
    a, b = _segments(pairs.input_ids[i], pairs.token_type_ids[i])
    (doc_a, pos_a), (doc_b, pos_b) = _where(a), _where(b)
    assert (doc_a == pairs.document[i]).all() and (doc_b == pairs.document[i]).all()
    # Truncation only drops tokens at the ends: each segment is a contiguous run ...
    assert (np.diff(pos_a) == 1).all() and (np.diff(pos_b) == 1).all()
    # ... and B comes after A.
    assert pos_b[0] > pos_a[-1]
    if len(a) + len(b) < SEQ_LEN - 3:  # Nothing was truncated: B starts right after A.
      assert pos_b[0] == pos_a[-1] + 1
      exact += 1
    checked += 1
  assert checked > 50 and exact > 10


def test_random_next_segment_comes_from_another_document(pairs):
  checked = 0
  for i in np.flatnonzero(pairs.next_sentence_label == 1):
    a, b = _segments(pairs.input_ids[i], pairs.token_type_ids[i])
    (doc_a, pos_a), (doc_b, pos_b) = _where(a), _where(b)
    assert (doc_a == pairs.document[i]).all()
    assert (np.diff(pos_a) == 1).all()
    assert len(set(doc_b.tolist())) == 1 and doc_b[0] != pairs.document[i]
    assert (np.diff(pos_b) == 1).all()
    checked += 1
  assert checked > 50


def test_every_document_is_used(synthetic, pairs):
  assert set(pairs.document.tolist()) == set(range(len(synthetic)))


def test_random_next_share_matches_the_option(token_documents):
  examples = build_pairs(token_documents, seq_len=128, short_seq_prob=0.1, random_next_prob=0.5,
                         rng=np.random.default_rng(2))
  n = len(examples)
  share = examples.next_sentence_label.mean()
  assert n > 1000
  assert abs(share - 0.5) < 4 * math.sqrt(0.25 / n) + 0.01, (share, n)


def test_no_random_next_without_nsp(synthetic, token_documents):
  for documents in (synthetic, token_documents):
    examples = build_pairs(documents, seq_len=SEQ_LEN, short_seq_prob=0.1, random_next_prob=0.0,
                           rng=np.random.default_rng(3))
    assert (examples.next_sentence_label == 0).all()


def _fixed_documents(n_docs=8, segments=2000, segment_len=5):
  """Documents of equal segments: with the full target, every chunk fills seq_len exactly."""
  return [[(NUM_SPECIAL + d * _DOC_STRIDE + np.arange(s * segment_len, (s + 1) * segment_len))
           .astype(np.int32) for s in range(segments)] for d in range(n_docs)]


def test_short_seq_prob_makes_some_examples_shorter():
  documents = _fixed_documents()
  seq_len = 128
  lengths = {}
  for prob in (0.0, 0.1):
    examples = build_pairs(documents, seq_len=seq_len, short_seq_prob=prob, random_next_prob=0.0,
                           rng=np.random.default_rng(4))
    lengths[prob] = (examples.input_ids != PAD_ID).sum(axis=1)
  assert (lengths[0.0] == seq_len).all()
  n = len(lengths[0.1])
  # A short target is uniform in [2, seq_len - 3]; one in ten chunks gets one.
  short = (lengths[0.1] < seq_len).mean()
  assert abs(short - 0.1) < 4 * math.sqrt(0.09 / n) + 0.01, (short, n)
  much_shorter = (lengths[0.1] < seq_len // 2).mean()
  assert 0.02 < much_shorter < 0.08, much_shorter
  assert lengths[0.1].min() < 16


def test_same_rng_same_examples(synthetic):
  make = lambda seed: build_pairs(synthetic, seq_len=SEQ_LEN, short_seq_prob=0.1,
                                  random_next_prob=0.5, rng=np.random.default_rng(seed))
  a, b, c = make(5), make(5), make(6)
  np.testing.assert_array_equal(a.input_ids, b.input_ids)
  np.testing.assert_array_equal(a.next_sentence_label, b.next_sentence_label)
  assert a.input_ids.shape != c.input_ids.shape or not np.array_equal(a.input_ids, c.input_ids)


# The loader.

VOCAB = 512
BATCH = 8


def _stream(documents, seed=0):
  return loader_lib.ExampleStream(documents, seq_len=SEQ_LEN, short_seq_prob=0.1,
                                  random_next_prob=0.5, seed=seed)


def _mask(batch, rngs):
  return {**batch, **mask_tokens(batch["input_ids"], rngs, MaskingOptions(), vocab_size=VOCAB)}


def _loader(documents, transforms=(("mlm", _mask),), **kwargs):
  return loader_lib.BatchLoader(_stream(documents), global_batch_size=BATCH,
                                transforms=list(transforms), seed=0, **kwargs)


def _assert_batches_equal(x, y):
  assert x.keys() == y.keys()
  for key in x:
    np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.fixture(scope="module")
def small_documents(token_documents):
  return token_documents[:12]


def test_batch_is_a_function_of_the_step(small_documents):
  first, second = _loader(small_documents), _loader(small_documents)
  epoch = first.epoch_size
  assert epoch > BATCH
  # Steps inside the first epoch, one that spans the epoch boundary, and one past it.
  steps = [0, 1, epoch // BATCH, 3 * epoch // BATCH + 1]
  for step in reversed(steps):  # Order of requests must not matter.
    _assert_batches_equal(first.batch(step), second.batch(step))
  batch = first.batch(0)
  assert set(batch) == {"input_ids", "token_type_ids", "next_sentence_label", "mlm_positions",
                        "mlm_ids", "mlm_weights"}
  assert batch["input_ids"].shape == (BATCH, SEQ_LEN)
  assert not np.array_equal(first.batch(0)["input_ids"], first.batch(1)["input_ids"])


def test_later_epochs_are_built_afresh(small_documents):
  stream = _stream(small_documents)
  n = stream.epoch_size
  one = stream.take(np.arange(n))
  two = stream.take(np.arange(n, 2 * n))
  assert one.input_ids.shape == two.input_ids.shape
  assert not np.array_equal(one.input_ids, two.input_ids)
  again = _stream(small_documents).take(np.arange(n, 2 * n))
  np.testing.assert_array_equal(two.input_ids, again.input_ids)


def test_iterate_yields_the_same_batches(small_documents):
  loader = _loader(small_documents)
  got = list(loader.iterate(3, 7, prefetch=2))
  assert [s for s, _ in got] == [3, 4, 5, 6]
  for step, batch in got:
    _assert_batches_equal(batch, loader.batch(step))


def test_iterate_raises_errors_of_the_producer(small_documents):
  def broken(batch, rngs):
    raise RuntimeError("boom")

  loader = _loader(small_documents, transforms=(("broken", broken),))
  with pytest.raises(RuntimeError, match="boom"):
    list(loader.iterate(0, 3, prefetch=2))


@pytest.mark.parametrize("with_masking", [False, True])
def test_hosts_get_their_rows_of_the_global_batch(small_documents, with_masking):
  transforms = (("mlm", _mask),) if with_masking else ()
  whole = _loader(small_documents, transforms)
  hosts = [_loader(small_documents, transforms, process_index=i, process_count=2)
           for i in range(2)]
  for step in (0, 5, whole.epoch_size // BATCH):
    global_batch = whole.batch(step)
    for i, host in enumerate(hosts):
      part = host.batch(step)
      rows = slice(i * BATCH // 2, (i + 1) * BATCH // 2)
      _assert_batches_equal(part, {k: v[rows] for k, v in global_batch.items()})


def test_transform_seed_depends_on_its_name(small_documents):
  a = _loader(small_documents, (("mlm", _mask),)).batch(0)
  b = _loader(small_documents, (("other", _mask),)).batch(0)
  np.testing.assert_array_equal(a["token_type_ids"], b["token_type_ids"])
  assert not np.array_equal(a["mlm_positions"], b["mlm_positions"])


def test_batch_size_must_split_over_hosts(small_documents):
  with pytest.raises(ValueError, match="hosts"):
    _loader(small_documents, process_index=0, process_count=3)
