"""Example formats and the loader over prepared shards: layout, coverage, determinism, hosts.

Most tests use synthetic prepared data whose tokens say where they come from (document and
position), written in several small shards so that reads cross shard boundaries.
"""

import math

import numpy as np
import pytest

from jaxlm.data import loader as loader_lib, random as random_lib, shards
from jaxlm.data.formats import make_format
from jaxlm.data.masking import MaskingOptions, mask_tokens
from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from jaxlm.errors import UserError

STRIDE = 10_000  # Synthetic token = 5 + document * STRIDE + position in the document.
SEQ_LEN = 32


def _write_synthetic(directory, n_docs=60, seed=0, shard_tokens=1500):
  """A prepared folder (train split only holds text) of documents of random sentences."""
  rng = np.random.default_rng(seed)
  writer = shards.ShardWriter(str(directory), "train", np.dtype(np.int32), shard_tokens)
  starts = []  # Sentence starts (document, position), for alignment checks.
  for d in range(n_docs):
    lengths = rng.integers(1, 25, int(rng.integers(1, 20)))
    if d % 17 == 0:
      lengths = np.array([3 * SEQ_LEN + 5])  # One sentence longer than any window.
    positions = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    starts.extend((d, int(p)) for p in positions)
    tokens = 5 + d * STRIDE + np.arange(lengths.sum())
    writer.add(tokens, lengths, np.array([len(lengths)]))
  entry = writer.finish()
  empty = shards.ShardWriter(str(directory), "eval", np.dtype(np.int32), shard_tokens).finish()
  shards.write_json(str(directory / shards.MANIFEST), dict(
      format_version=shards.FORMAT_VERSION, fingerprint="synthetic", inputs=[], recipe={},
      token_dtype="int32", vocab_size=10**6, splits=dict(train=entry, eval=empty)))
  return shards.PreparedData(str(directory)), set(starts)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  return _write_synthetic(tmp_path_factory.mktemp("synthetic"))


def _where(tokens):
  tokens = np.asarray(tokens, np.int64) - 5
  return tokens // STRIDE, tokens % STRIDE


def _all(fmt, **kw):
  return fmt.examples(np.arange(len(fmt)), random_lib.row_keys(3, np.arange(len(fmt))))


def _split_tokens(split):
  return split.take(np.arange(split.num_tokens))


def test_data_spans_several_shards(synthetic):
  data, _ = synthetic
  assert len(data.manifest["splits"]["train"]["shards"]) >= 4


def test_packed_windows_are_the_stream_exactly(synthetic):
  data, _ = synthetic
  split = data.splits["train"]
  fmt = make_format("packed", split, SEQ_LEN)
  ids = _all(fmt)["input_ids"]
  stream = []
  for d in range(split.num_documents):
    stream.extend(split.take(np.arange(split.document_starts[d], split.document_starts[d + 1])))
    stream.append(SEP_ID)
  flat = ids.reshape(-1)
  np.testing.assert_array_equal(flat[:len(stream)], stream)
  assert (flat[len(stream):] == PAD_ID).all() and len(flat) - len(stream) < SEQ_LEN


def test_full_sentences_tile_the_stream_and_start_at_sentences(synthetic):
  data, starts = synthetic
  split = data.splits["train"]
  fmt = make_format("full_sentences", split, SEQ_LEN)
  batch = _all(fmt)
  window_starts, lengths = fmt.window(np.arange(len(fmt)))
  assert (lengths >= 1).all() and (lengths <= SEQ_LEN - 2).all()
  pieces = []
  for row, n in zip(batch["input_ids"], lengths):
    assert row[0] == CLS_ID and row[n + 1] == SEP_ID and (row[n + 2:] == PAD_ID).all()
    pieces.append(row[1:n + 1])
  content = np.concatenate(pieces)
  text = content[content != SEP_ID]
  np.testing.assert_array_equal(text, _split_tokens(split))  # Nothing lost, nothing repeated.
  assert (content == SEP_ID).sum() == split.num_documents
  # A window starts at a sentence whenever one lies in its slack (the last eighth before its
  # nominal start), at the last such sentence.
  doc_starts = split.document_starts + np.arange(split.num_documents + 1)  # Stream positions.
  sentence_starts = np.array(sorted(doc_starts[d] + p for d, p in starts))
  slack = max(1, (SEQ_LEN - 2) // 8)
  aligned = 0
  for w in range(1, len(fmt)):
    nominal = w * int(doc_starts[-1]) // len(fmt)
    inside = sentence_starts[(sentence_starts >= nominal - slack) & (sentence_starts <= nominal)]
    assert window_starts[w] == (inside[-1] if len(inside) else nominal)
    aligned += len(inside) > 0
  assert aligned > 0.2 * len(fmt)


def _segments(row, types):
  n = int((row != PAD_ID).sum())
  assert (row[n:] == PAD_ID).all() and row[0] == CLS_ID and row[n - 1] == SEP_ID
  seps = np.flatnonzero(row[:n] == SEP_ID)
  assert len(seps) == 2, row[:n]
  np.testing.assert_array_equal(types[:seps[0] + 1], 0)
  np.testing.assert_array_equal(types[seps[0] + 1:n], 1)
  return row[1:seps[0]], row[seps[0] + 1:n - 1]


def test_pairs_without_randomness_cover_every_token_in_order(synthetic):
  data, _ = synthetic
  split = data.splits["train"]
  fmt = make_format("pairs", split, SEQ_LEN, short_seq_prob=0.0, random_next_prob=0.0)
  batch = _all(fmt)
  assert (batch["next_sentence_label"] == 0).all()
  text = []
  for row, types in zip(batch["input_ids"], batch["token_type_ids"]):
    a, b = _segments(row, types)
    assert len(a) >= 1 and len(a) + len(b) <= SEQ_LEN - 3
    text.extend(a)
    text.extend(b)
  np.testing.assert_array_equal(text, _split_tokens(split))


def test_pairs_split_a_and_b_at_sentences_and_nsp_takes_other_documents(synthetic):
  data, starts = synthetic
  fmt = make_format("pairs", data.splits["train"], SEQ_LEN, short_seq_prob=0.1,
                    random_next_prob=0.5)
  batch = _all(fmt)
  labels = batch["next_sentence_label"]
  n = len(labels)
  assert abs(labels.mean() - 0.5) < 4 * math.sqrt(0.25 / n) + 0.01
  at_sentence = checked = shorter = 0
  for row, types, label in zip(batch["input_ids"], batch["token_type_ids"], labels):
    a, b = _segments(row, types)
    (doc_a, pos_a), (doc_b, pos_b) = _where(a), _where(b)
    assert len(set(doc_a.tolist())) == 1 and (np.diff(pos_a) == 1).all()
    if len(b):
      assert len(set(doc_b.tolist())) == 1 and (np.diff(pos_b) == 1).all()
      assert (doc_b[0] != doc_a[0]) == bool(label)
      if label:  # A random B starts at a sentence of its document.
        assert (int(doc_b[0]), int(pos_b[0])) in starts
      else:
        assert pos_b[0] == pos_a[-1] + 1
        checked += 1
        at_sentence += (int(doc_b[0]), int(pos_b[0])) in starts
    shorter += len(a) + len(b) < SEQ_LEN - 3 - 4
  assert at_sentence / checked > 0.8
  assert shorter > 0.05 * n  # short_seq_prob makes some examples short.
  # No shortcut: a random B is as long as the real one would have been.
  filled = (batch["input_ids"] != PAD_ID).sum(1)
  mean_0, mean_1 = filled[labels == 0].mean(), filled[labels == 1].mean()
  assert abs(mean_0 - mean_1) < 0.05 * mean_0, (mean_0, mean_1)


def test_nsp_pairs_need_two_documents(tmp_path):
  data, _ = _write_synthetic(tmp_path, n_docs=1)
  fmt = make_format("pairs", data.splits["train"], SEQ_LEN, random_next_prob=0.5)
  assert (_all(fmt)["next_sentence_label"] == 0).all()


def test_empty_split_is_a_clear_error(synthetic):
  data, _ = synthetic
  with pytest.raises(UserError, match="eval split .* is empty"):
    make_format("full_sentences", data.splits["eval"], SEQ_LEN)
  with pytest.raises(UserError, match="Unknown data.format 'pakced'"):
    make_format("pakced", data.splits["train"], SEQ_LEN)


def _mask(batch, keys):
  return {**batch, **mask_tokens(batch["input_ids"], keys, MaskingOptions(), vocab_size=500)}


def _loader(fmt, **kw):
  options = dict(global_batch_size=8, transforms=[("mlm", _mask)], seed=5)
  options.update(kw)
  return loader_lib.BatchLoader(fmt, **options)


@pytest.fixture(scope="module")
def pairs_format(synthetic):
  data, _ = synthetic
  return make_format("pairs", data.splits["train"], SEQ_LEN, short_seq_prob=0.1,
                     random_next_prob=0.5)


def test_each_epoch_is_a_permutation_and_epochs_differ(pairs_format):
  loader = _loader(pairs_format)
  n = loader.epoch_size
  steps = -(-2 * n // 8)
  examples = np.concatenate([loader.example_indices(s)[1] for s in range(steps)])
  assert sorted(examples[:n].tolist()) == list(range(n))
  assert sorted(examples[n:2 * n].tolist()) == list(range(n))
  assert not np.array_equal(examples[:n], examples[n:2 * n])


def test_a_batch_is_a_function_of_the_step_alone(pairs_format):
  a, b = _loader(pairs_format), _loader(pairs_format)
  for step in (7, 0, 123, 7):  # Any order, fresh or reused loaders: the same batch.
    for key in ("input_ids", "token_type_ids", "next_sentence_label", "mlm_ids", "mlm_positions"):
      np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
  resumed = [batch for _, batch in b.iterate(5, 9)]
  straight = [batch for step, batch in a.iterate(0, 9)][5:]
  for x, y in zip(resumed, straight):
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
  assert not np.array_equal(a.batch(1)["input_ids"], a.batch(2)["input_ids"])
  other_seed = _loader(pairs_format, seed=6)
  assert not np.array_equal(a.batch(1)["input_ids"], other_seed.batch(1)["input_ids"])


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_rows_are_disjoint_and_cover_the_global_batch(pairs_format, hosts):
  whole = _loader(pairs_format).batch(3)
  parts = [_loader(pairs_format, process_index=i, process_count=hosts).batch(3)
           for i in range(hosts)]
  g = [_loader(pairs_format, process_index=i, process_count=hosts).example_indices(3)[0]
       for i in range(hosts)]
  assert sorted(np.concatenate(g).tolist()) == list(range(24, 32))
  for key, value in whole.items():
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)


def test_worker_processes_give_the_same_batches_in_order(pairs_format):
  loader = _loader(pairs_format)
  from_workers = list(loader.iterate(2, 9, workers=2))
  assert [s for s, _ in from_workers] == list(range(2, 9))
  for step, batch in from_workers:
    for key, value in loader.batch(step).items():
      np.testing.assert_array_equal(batch[key], value)


def test_a_failing_transform_is_raised_from_a_worker(pairs_format):
  def broken(batch, keys):
    raise ValueError("transform exploded")

  loader = _loader(pairs_format, transforms=[("broken", broken)])
  with pytest.raises(ValueError, match="transform exploded"):
    next(loader.iterate(0, 3))


def _refuse(batch, keys):  # Top level: worker processes are spawned, so transforms are pickled.
  raise UserError("this option makes no sense")


def test_a_user_error_in_a_worker_stays_a_user_error(pairs_format):
  loader = _loader(pairs_format, transforms=[("refuse", _refuse)])
  with pytest.raises(UserError, match="this option makes no sense"):
    next(loader.iterate(0, 3, workers=1))


def test_fixed_set_pads_its_last_batch(pairs_format):
  loader = _loader(pairs_format, num_examples=21)
  assert loader.steps == 3
  last = loader.batch(2)
  assert (last["next_sentence_label"][5:] == -1).all()
  assert (last["next_sentence_label"][:5] >= 0).all()
  assert (last["mlm_weights"][5:] == 0).all() and (last["mlm_weights"][:5].sum(1) > 0).all()
  whole = _loader(pairs_format, num_examples=21, global_batch_size=24).batch(0)
  rows = np.concatenate([loader.batch(s)["input_ids"] for s in range(3)])[:21]
  np.testing.assert_array_equal(whole["input_ids"][:21], rows)  # Whatever the batch size.


@pytest.mark.parametrize("sentences", [1, 2, 31, 32, 33, 65, 1000])
def test_sentence_search_through_the_sample_equals_a_full_binary_search(sentences):
  rng = np.random.default_rng(sentences)
  starts = np.concatenate([[0], np.cumsum(rng.integers(1, 20, sentences))])
  shard = shards._Shard(0, np.zeros(0), starts, starts[::shards.SAMPLE_EVERY])
  values = rng.integers(-2, starts[-1] + 3, 500)
  for side in ("left", "right"):
    np.testing.assert_array_equal(shard.rank(values, side), np.searchsorted(starts, values, side))
