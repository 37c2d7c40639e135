"""Labelled classification data: reading and its errors, label maps, pair encoding, the loader."""

import json

import numpy as np
import pytest

from jaxlm.data import labelled
from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID
from jaxlm.errors import UserError


class _DigitTokenizer:
  """Each whitespace-separated integer is its own piece id: encodings written by hand."""

  def encode_batch(self, texts):
    return [[int(word) for word in text.split()] for text in texts]


def _write(tmp_path, name, content) -> str:
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
  return str(path)


# (file name, content, what the message must say besides the file name).
BAD_FILES = [
    ("cols.tsv", "sentence\tlabel\nhello\tpos\n",
     [":1:", "no 'text' column", "['sentence', 'label']", "text_b"]),
    ("cols.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "class": "y"}\n',
     [":2:", "no 'label' key", "['class', 'text']"]),
    ("empty_text.csv", "text,label\nfine,x\n   ,y\n", [":3:", "empty 'text'"]),
    ("empty_pair.tsv", "text\ttext_b\tlabel\na\tb\tx\nc\t\ty\n", [":3:", "empty 'text_b'"]),
    ("empty_label.tsv", "text\tlabel\na\tx\nb\t \n", [":3:", "empty 'label'"]),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": }\n',
     [":3:", "not valid JSON"]),
    ("list.jsonl", '["a", "x"]\n', [":1:", "not an object"]),
    ("float.jsonl", '{"text": "a", "label": 1.5}\n', [":1:", "label is a float"]),
    ("latin1.tsv", b"text\tlabel\nok\tx\ncaf\xe9\ty\n", [":3:", "not valid UTF-8", "iconv"]),
    ("fields.tsv", "text\tlabel\na\tx\nb\tc\ty\n", [":3:", "3 fields", "header has 2"]),
    ("notes.txt", "text\tlabel\na\tx\n", ["unknown extension '.txt'", ".jsonl, .tsv, .csv"]),
    ("nothing.jsonl", "\n\n", ["no examples"]),
    ("header_only.csv", "text,label\n", ["no examples", "header"]),
    ("twice.csv", "text,label,text\na,x,b\n", [":1:", "'text' twice"]),
]


@pytest.mark.parametrize("name, content, words", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_bad_files_name_the_file_line_and_fix(tmp_path, name, content, words):
  path = _write(tmp_path, name, content)
  with pytest.raises(UserError) as info:
    labelled.read_examples(path)
  message = str(info.value)
  assert message.startswith(path)
  for word in words:
    assert word in message


def test_missing_file_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="no such file"):
    labelled.read_examples(str(tmp_path / "absent.tsv"))


def test_the_three_formats_read_alike(tmp_path):
  pair = ('a "quoted", text', "second part", "neg")
  jsonl = (json.dumps({"text": "one two", "label": "pos"}) + "\n"
           + json.dumps({"text": pair[0], "text_b": pair[1], "label": pair[2]}) + "\n")
  got = labelled.read_examples(_write(tmp_path, "a.jsonl", jsonl))
  assert [(e.text, e.text_b, e.label, e.line) for e in got] == [
      ("one two", None, "pos", 1), (*pair, 2)]
  # Columns in any order, extra ones ignored; CSV quoting, TSV none (a '"' is text).
  csv_text = 'label,text,text_b,idx\npos,one two,other,0\nneg,"a ""quoted"", text",second part,1\n'
  tsv = 'idx\ttext\ttext_b\tlabel\n0\tone two\tother\tpos\n1\ta "quoted", text\tsecond part\tneg\n'
  for name, content in (("a.csv", csv_text), ("a.tsv", tsv)):
    got = labelled.read_examples(_write(tmp_path, name, content))
    assert [(e.text, e.text_b, e.label, e.line) for e in got] == [
        ("one two", "other", "pos", 2), (*pair, 3)], name


def test_csv_line_numbers_count_multiline_records(tmp_path):
  good = labelled.read_examples(_write(tmp_path, "g.csv", 'text,label\n"two\nlines",x\nnext,y\n'))
  assert [e.line for e in good] == [2, 4]
  with pytest.raises(UserError, match=r"m\.csv:5: empty 'text'"):
    labelled.read_examples(_write(tmp_path, "m.csv", 'text,label\n"two\nlines",x\nnext,y\n,z\n'))


def test_label_map_sorts_and_round_trips(tmp_path):
  path = _write(tmp_path, "t.tsv", "text\tlabel\na\tpos\nb\tneg\nc\tneutral\nd\tpos\n")
  label_map = labelled.LabelMap.from_examples(labelled.read_examples(path), path)
  assert label_map.labels == ("neg", "neutral", "pos") and label_map.num_classes == 3
  saved = str(tmp_path / "run" / labelled.LABELS_FILE)
  label_map.save(saved)
  loaded = labelled.LabelMap.load(saved)
  assert loaded == label_map and loaded.source == path
  assert json.load(open(saved))["labels"] == ["neg", "neutral", "pos"]


def test_integer_labels_sort_numerically_and_match_strings(tmp_path):
  rows = "".join(json.dumps({"text": f"t{k}", "label": k % 12}) + "\n" for k in range(24))
  train = _write(tmp_path, "t.jsonl", rows)
  label_map = labelled.LabelMap.from_examples(labelled.read_examples(train), train)
  assert label_map.labels == tuple(str(k) for k in range(12))  # "10" after "9", not after "1".
  other = _write(tmp_path, "e.tsv", "text\tlabel\na\t10\nb\t2\n")
  assert label_map.ids(labelled.read_examples(other), other).tolist() == [10, 2]


def test_one_class_and_unknown_eval_label(tmp_path, tokenizer):
  one = _write(tmp_path, "one.tsv", "text\tlabel\na\tpos\nb\tpos\n")
  with pytest.raises(UserError, match=r"one\.tsv: all 2 examples \(lines 2-3\).*'pos'.*two"):
    labelled.load_set(one, tokenizer, 16)
  train = _write(tmp_path, "train.tsv", "text\tlabel\na\tpos\nb\tneg\n")
  label_map = labelled.load_set(train, tokenizer, 16).label_map
  evaluation = _write(tmp_path, "eval.tsv", "text\tlabel\na\tneg\nb\tneutral\n")
  with pytest.raises(UserError) as info:
    labelled.load_set(evaluation, tokenizer, 16, label_map)
  message = str(info.value)
  assert message.startswith(f"{evaluation}:3:") and "'neutral'" in message
  assert train in message and "['neg', 'pos']" in message and "add examples" in message


@pytest.mark.parametrize("content, words", [
    ("{", ["not valid JSON"]),
    ('{"labels": ["only"]}', ["two distinct"]),
    ('{"labels": ["a", "a"]}', ["two distinct"]),
])
def test_label_map_load_errors(tmp_path, content, words):
  path = _write(tmp_path, "labels.json", content)
  with pytest.raises(UserError) as info:
    labelled.LabelMap.load(path)
  assert str(info.value).startswith(path) and all(w in str(info.value) for w in words)


def _reference_truncation(length_a, length_b, budget):
  """BERT's loop: drop the last token of the longer segment (b on a tie) until both fit."""
  while length_a + length_b > budget:
    if length_a > length_b:
      length_a -= 1
    else:
      length_b -= 1
  return length_a, length_b


def test_truncate_pair_matches_berts_loop():
  for budget in (5, 6, 9):
    for length_a in range(0, 14):
      for length_b in range(0, 14):
        got = labelled.truncate_pair(length_a, length_b, budget)
        assert got == _reference_truncation(length_a, length_b, budget), (length_a, length_b)


def _examples(*rows):
  return [labelled.Example(a, b, "x", k + 2) for k, (a, b) in enumerate(rows)]


def test_encoding_against_hand_built_rows():
  examples = _examples(
      ("11 12 13", None),  # Fits: [CLS] a [SEP], then padding.
      ("11 12 13 14 15 16 17 18 19 20", None),  # Cut to seq_len - 2 pieces.
      ("11 12", "21 22 23"),  # A pair that fits.
      ("11 12 13 14 15 16 17 18", "21 22"),  # The longer a is cut: 5 + 2 = 10 - 3.
      ("11 12 13 14 15 16", "21 22 23 24 25 26"),  # Equal: b cut first, then they alternate.
  )
  out = labelled.encode(_DigitTokenizer(), examples, seq_len=10)
  C, S, P = CLS_ID, SEP_ID, PAD_ID
  want_ids = [
      [C, 11, 12, 13, S, P, P, P, P, P],
      [C, 11, 12, 13, 14, 15, 16, 17, 18, S],
      [C, 11, 12, S, 21, 22, 23, S, P, P],
      [C, 11, 12, 13, 14, 15, S, 21, 22, S],
      [C, 11, 12, 13, 14, S, 21, 22, 23, S],
  ]
  want_types = [
      [0] * 10,
      [0] * 10,
      [0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 1, 1, 1],
      [0, 0, 0, 0, 0, 0, 1, 1, 1, 1],
  ]
  assert out["input_ids"].dtype == np.int32 and out["token_type_ids"].dtype == np.int32
  np.testing.assert_array_equal(out["input_ids"], want_ids)
  np.testing.assert_array_equal(out["token_type_ids"], want_types)
  assert out["truncated"].tolist() == [False, True, False, True, True]
  with pytest.raises(UserError, match="at least 8"):
    labelled.encode(_DigitTokenizer(), examples, seq_len=6)


def test_load_set_with_the_real_tokenizer(tmp_path, tokenizer):
  path = _write(tmp_path, "t.jsonl", '{"text": "the model", "text_b": "a token", "label": "b"}\n'
                                     '{"text": "attention heads", "label": "a"}\n')
  data = labelled.load_set(path, tokenizer, 16)
  assert len(data) == 2 and data.seq_len == 16 and data.labels.tolist() == [1, 0]
  row, types = data.input_ids[0], data.token_type_ids[0]
  first, second = np.flatnonzero(row == SEP_ID)[:2]
  assert row[0] == CLS_ID and tokenizer.decode(row[1:first]) == "the model"
  assert tokenizer.decode(row[first + 1:second]) == "a token"
  assert types[:first + 1].max() == 0 and types[first + 1:second + 1].min() == 1
  assert data.description["pairs"] == 1 and data.description["classes"] == 2
  assert data.description["label_counts"] == {"a": 1, "b": 1}
  # The fingerprint follows the file's bytes and seq_len, nothing else.
  assert labelled.load_set(path, tokenizer, 16).fingerprint == data.fingerprint
  assert labelled.load_set(path, tokenizer, 32).fingerprint != data.fingerprint
  other = _write(tmp_path, "u.jsonl", open(path).read() + '{"text": "more", "label": "a"}\n')
  assert labelled.load_set(other, tokenizer, 16).fingerprint != data.fingerprint


def _set(n=10, seq_len=8):
  """n examples whose first piece (after [CLS]) is 100 + its index, labels k % 3."""
  ids = np.full((n, seq_len), PAD_ID, np.int32)
  ids[:, 0], ids[:, 1], ids[:, 2] = CLS_ID, 100 + np.arange(n), SEP_ID
  return labelled.LabelledSet("x.tsv", labelled.LabelMap(("a", "b", "c")), ids,
                              np.zeros_like(ids), (np.arange(n) % 3).astype(np.int32), "f" * 32,
                              {"examples": n})


def _indices(batch):
  return (batch["input_ids"][:, 1] - 100).tolist()


def test_training_stream_shuffles_each_epoch_and_resumes():
  data = _set(n=12)
  loader = labelled.LabelledLoader(data, global_batch_size=4, train=True, seed=7)
  assert loader.steps is None
  epochs = [[k for s in range(3 * e, 3 * e + 3) for k in _indices(loader.batch(s))]
            for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))  # Each epoch visits every example once.
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(12))
  batch = loader.batch(4)
  assert set(batch) == {"input_ids", "token_type_ids", "labels", "label_weights"}
  assert batch["labels"].dtype == np.int32 and batch["label_weights"].dtype == np.float32
  np.testing.assert_array_equal(batch["labels"], np.array(_indices(batch)) % 3)
  np.testing.assert_array_equal(batch["label_weights"], np.ones(4, np.float32))
  # A pure function of the step: a fresh loader resuming at step 5 gives the same batches.
  fresh = labelled.LabelledLoader(data, global_batch_size=4, train=True, seed=7)
  resumed = list(fresh.iterate(5, 9))
  assert [s for s, _ in resumed] == [5, 6, 7, 8]
  for step, got in resumed:
    for key, value in loader.batch(step).items():
      np.testing.assert_array_equal(got[key], value)
  other_seed = labelled.LabelledLoader(data, global_batch_size=4, train=True, seed=8)
  assert [_indices(other_seed.batch(s)) for s in range(3)] != [
      _indices(loader.batch(s)) for s in range(3)]


def test_each_process_gets_its_rows_of_the_global_batch():
  data = _set(n=10)
  whole = labelled.LabelledLoader(data, global_batch_size=6, train=True, seed=1)
  parts = [labelled.LabelledLoader(data, global_batch_size=6, train=True, seed=1,
                                   process_index=k, process_count=2) for k in range(2)]
  for step in range(4):
    joined = {key: np.concatenate([p.batch(step)[key] for p in parts]) for key in
              ("input_ids", "labels")}
    for key, value in joined.items():
      np.testing.assert_array_equal(value, whole.batch(step)[key])
  assert parts[1].batch(0)["input_ids"].shape == (3, 8)
  with pytest.raises(ValueError):
    labelled.LabelledLoader(data, global_batch_size=5, train=True, process_count=2)


def test_eval_set_is_in_file_order_and_padded_with_weight_zero():
  data = _set(n=10)
  loader = labelled.LabelledLoader(data, global_batch_size=4, train=False)
  assert loader.steps == 3 and loader.fingerprint == data.fingerprint
  assert loader.description == {"examples": 10}
  batches = [loader.batch(s) for s in range(loader.steps)]
  assert [_indices(b) for b in batches[:2]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  last = batches[-1]
  assert _indices(last)[:2] == [8, 9]
  np.testing.assert_array_equal(last["label_weights"], [1, 1, 0, 0])
  np.testing.assert_array_equal(last["input_ids"][2:], PAD_ID)
  np.testing.assert_array_equal(last["labels"], [8 % 3, 9 % 3, 0, 0])
  assert sum(float(b["label_weights"].sum()) for b in batches) == len(data)
  second_host = labelled.LabelledLoader(data, global_batch_size=4, train=False, process_index=1,
                                        process_count=2)
  np.testing.assert_array_equal(second_host.batch(2)["label_weights"], [0, 0])


def test_iterate_in_worker_processes_matches_batch():
  loader = labelled.LabelledLoader(_set(n=10), global_batch_size=4, train=True, seed=3)
  got = list(loader.iterate(2, 5, workers=1))
  assert [s for s, _ in got] == [2, 3, 4]
  for step, batch in got:
    np.testing.assert_array_equal(batch["input_ids"], loader.batch(step)["input_ids"])
