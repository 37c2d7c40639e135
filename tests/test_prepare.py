"""`jaxlm.prepare`: shards that keep every token, stable splits, atomic output, counted repairs."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm.data import prepare, setup, shards
from jaxlm.errors import UserError


def _options(inputs, output, tokenizer, **kw):
  return prepare.PrepareOptions(inputs=str(inputs), output=str(output), tokenizer=tokenizer.path,
                                **kw)


def _documents(split):
  """Each document of a split as a tuple of tokens."""
  starts = split.document_starts
  tokens = split.take(np.arange(split.num_tokens))
  return [tuple(tokens[starts[d]:starts[d + 1]].tolist()) for d in range(split.num_documents)]


def _write_docs(path, documents):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n\n".join("\n".join(d) for d in documents) + "\n")


def test_every_token_of_the_text_is_in_the_shards(prepared_corpus, tokenizer, corpus_documents):
  from conftest import sentences_of

  expected = sum(len(ids) for ids in tokenizer.encode_batch(sentences_of(corpus_documents)))
  splits = prepared_corpus.splits
  assert splits["train"].num_tokens + splits["eval"].num_tokens == expected
  assert splits["train"].num_documents + splits["eval"].num_documents == len(corpus_documents)
  assert 0 < splits["eval"].num_documents < 0.15 * len(corpus_documents)
  with open(os.path.join(prepared_corpus.directory, shards.STATS)) as f:
    stats = json.load(f)
  assert stats["tokens"] == expected and stats["documents"] == len(corpus_documents)
  assert stats["text_mb_per_s"] > 0 and stats["sentencepiece_mb_per_s_one_thread"] > 0


def test_workers_give_the_same_shards_as_one_process(tmp_path, tokenizer, prepared_corpus):
  manifest = prepare.prepare(_options(setup.default_corpus_path(), tmp_path / "w2", tokenizer,
                                      eval_fraction=0.05, num_workers=2))
  assert manifest["fingerprint"] == prepared_corpus.fingerprint


def test_adding_a_file_moves_no_document_between_splits(tmp_path, tokenizer, corpus_documents):
  _write_docs(tmp_path / "a.txt.gz", corpus_documents[:80])
  _write_docs(tmp_path / "b.txt.gz", corpus_documents[80:])
  prepare.prepare(_options(tmp_path / "a.txt.gz", tmp_path / "one", tokenizer, eval_fraction=0.2))
  prepare.prepare(_options(f"{tmp_path}/a.txt.gz,{tmp_path}/b.txt.gz", tmp_path / "two",
                           tokenizer, eval_fraction=0.2))
  one, two = shards.PreparedData(str(tmp_path / "one")), shards.PreparedData(str(tmp_path / "two"))
  for split in shards.SPLITS:
    before, after = _documents(one.splits[split]), set(_documents(two.splits[split]))
    assert before and set(before) <= after, split
  assert not set(_documents(one.splits["eval"])) & set(_documents(two.splits["train"]))


def test_a_stopped_prepare_is_not_complete_and_a_rerun_finishes(tmp_path, tokenizer,
                                                                 prepared_corpus, monkeypatch):
  output = tmp_path / "cut"
  real = shards.ShardWriter.finish

  def crash(self):
    raise KeyboardInterrupt  # Stopped just before the last shard is closed.

  monkeypatch.setattr(shards.ShardWriter, "finish", crash)
  with pytest.raises(KeyboardInterrupt):
    prepare.prepare(_options(setup.default_corpus_path(), output, tokenizer, eval_fraction=0.05))
  monkeypatch.setattr(shards.ShardWriter, "finish", real)
  assert not shards.is_prepared(str(output))
  assert os.listdir(output)  # It left files behind ...
  with pytest.raises(UserError, match="not a complete prepared data folder"):
    shards.PreparedData(str(output))  # ... which are never mistaken for data.
  manifest = prepare.prepare(_options(setup.default_corpus_path(), output, tokenizer,
                                      eval_fraction=0.05))
  assert manifest["fingerprint"] == prepared_corpus.fingerprint


def test_a_killed_prepare_process_leaves_no_complete_folder(tmp_path, tokenizer, repo_root):
  big = tmp_path / "big.txt"
  with gzip.open(setup.default_corpus_path(), "rt", encoding="utf-8") as f:
    text = f.read()
  with open(big, "w", encoding="utf-8") as f:
    for copy in range(6):  # Distinct documents, ~10 MB.
      f.write(text.replace("\n\n", f" {copy}\n\n"))
  command = [sys.executable, "-m", "jaxlm.prepare", f"--input={big}", f"--output={tmp_path / 'out'}",
             f"--tokenizer={tokenizer.path}", "--num_workers=1"]
  process = subprocess.Popen(command, cwd=repo_root, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while not list((tmp_path / "out").glob("train-*.tokens")) and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not shards.is_prepared(str(tmp_path / "out"))
  done = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  data = shards.PreparedData(str(tmp_path / "out"))
  assert data.splits["train"].num_documents + data.splits["eval"].num_documents == 6 * 146


def test_a_complete_folder_is_reused_or_refused(tmp_path, tokenizer, corpus_documents):
  _write_docs(tmp_path / "a.txt.gz", corpus_documents[:10])
  options = _options(tmp_path / "a.txt.gz", tmp_path / "out", tokenizer)
  first = prepare.prepare(options)
  mtime = os.path.getmtime(tmp_path / "out" / shards.MANIFEST)
  assert prepare.is_up_to_date(options)
  assert prepare.prepare(options) == first
  assert os.path.getmtime(tmp_path / "out" / shards.MANIFEST) == mtime  # Not redone.
  _write_docs(tmp_path / "a.txt.gz", corpus_documents[:12])
  assert not prepare.is_up_to_date(options)
  with pytest.raises(UserError, match="--overwrite"):
    prepare.prepare(options)
  (tmp_path / "foreign").mkdir()
  (tmp_path / "foreign" / "notes.txt").write_text("mine")
  with pytest.raises(UserError, match="not empty and is not a jaxlm prepared folder"):
    prepare.prepare(_options(tmp_path / "a.txt.gz", tmp_path / "foreign", tokenizer))


def test_hostile_input_is_repaired_and_counted(tmp_path, tokenizer):
  raw = (b"Fine first paragraph of a document.\r\n"
         b"Bad bytes \xff\xfe here and a NUL\x00 there.\n\n"
         b"\n\n\n"
         + b"word " * 400_000 + b"\n\n"  # One line of 2 MB.
         b"Last document.\n")
  (tmp_path / "hostile.txt").write_bytes(raw)
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "records.jsonl").write_text(
      '{"text": "A record with text."}\n{"text": ""}\nnot json\n{"body": "no text field"}\n')
  prepare.prepare(_options(f"{tmp_path}/*.txt,{tmp_path}/*.jsonl", tmp_path / "out", tokenizer,
                           eval_fraction=0.0))
  with open(tmp_path / "out" / shards.STATS) as f:
    stats = json.load(f)
  repairs = stats["repaired_or_skipped"]
  for key in ("invalid_utf8_lines", "nul_lines", "crlf_lines", "long_lines_split", "empty_files",
              "empty_documents_skipped", "invalid_json_records_skipped",
              "records_without_text_skipped"):
    assert repairs.get(key, 0) >= 1, (key, repairs)
  data = shards.PreparedData(str(tmp_path / "out"))
  assert data.splits["train"].num_documents == 4  # 3 from the .txt file, 1 record.
  assert data.splits["train"].num_tokens > 400_000  # The long line is all there.


def test_missing_and_broken_inputs_name_the_file(tmp_path, tokenizer):
  with pytest.raises(UserError, match="nothing_here"):
    prepare.prepare(_options(tmp_path / "nothing_here*.txt", tmp_path / "out", tokenizer))
  broken = tmp_path / "broken.txt.gz"
  broken.write_bytes(gzip.compress(b"some text\n" * 1000)[:-30])
  with pytest.raises(UserError, match="broken.txt.gz"):
    prepare.prepare(_options(broken, tmp_path / "out2", tokenizer))
  assert not shards.is_prepared(str(tmp_path / "out2"))


def test_a_damaged_folder_is_refused_then_redone(tmp_path, tokenizer, corpus_documents):
  _write_docs(tmp_path / "a.txt.gz", corpus_documents[:10])
  options = _options(tmp_path / "a.txt.gz", tmp_path / "out", tokenizer)
  first = prepare.prepare(options)
  shard = tmp_path / "out" / "train-00000.tokens"
  shard.write_bytes(shard.read_bytes()[:-10])  # Cut short, as a full disk would leave it.
  with pytest.raises(UserError, match="train-00000.tokens.*wrong size"):
    shards.PreparedData(str(tmp_path / "out"))
  assert not prepare.is_up_to_date(options)
  assert prepare.prepare(options)["fingerprint"] == first["fingerprint"]
  shards.PreparedData(str(tmp_path / "out"))  # Readable again.
  (tmp_path / "out" / shards.MANIFEST).write_text("{not json")
  with pytest.raises(UserError, match="unreadable.*--overwrite"):
    prepare.prepare(options)
  assert prepare.prepare(_options(tmp_path / "a.txt.gz", tmp_path / "out", tokenizer,
                                  overwrite=True))["fingerprint"] == first["fingerprint"]


def test_the_fingerprint_covers_document_boundaries(tmp_path, tokenizer, corpus_documents):
  joined = [[p for d in corpus_documents[:4] for p in d]]  # The same text as one document.
  _write_docs(tmp_path / "four.txt.gz", corpus_documents[:4])
  _write_docs(tmp_path / "one.txt.gz", joined)
  four = prepare.prepare(_options(tmp_path / "four.txt.gz", tmp_path / "a", tokenizer,
                                  eval_fraction=0.0))
  one = prepare.prepare(_options(tmp_path / "one.txt.gz", tmp_path / "b", tokenizer,
                                 eval_fraction=0.0))
  assert four["splits"]["train"]["tokens"] == one["splits"]["train"]["tokens"]
  assert four["fingerprint"] != one["fingerprint"]
