"""The streaming text reader: hostile input is repaired or skipped and counted, never lost silently;
broken files are UserErrors naming them; sentences are split in any script without losing text."""

import gzip
import json
import random

import pytest

from jaxlm.data import text
from jaxlm.errors import UserError

DOCS = [["First paragraph of one.", "Second paragraph, with 3.14 in it."],
        ["Only paragraph of two."],
        ["Три абзаца.", "今天天气很好。", "यह अच्छा है।"]]


def _write(path, data: bytes):
  if str(path).endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)
  return str(path)


def _read(path, **kwargs):
  counts = text.Counts()
  return list(text.iter_documents(path, counts=counts, **kwargs)), counts


def _squeeze(s: str) -> str:
  """The text without whitespace: what no split or repair may lose."""
  return "".join(s.split())


@pytest.mark.parametrize("name", ["c.txt", "c.txt.gz", "c.jsonl", "c.jsonl.gz"])
def test_txt_and_jsonl_give_the_same_documents(tmp_path, name):
  if ".jsonl" in name:
    data = "".join(json.dumps({"id": i, "text": "\n".join(d)}) + "\n" for i, d in enumerate(DOCS))
  else:
    data = "\n\n\n".join("\n".join(d) for d in DOCS) + "\n"
  docs, counts = _read(_write(tmp_path / name, data.encode()))
  assert docs == DOCS
  assert counts["documents"] == 3
  assert counts["lines_read"] == data.count("\n")
  assert not set(counts) - {"documents", "lines_read"}, counts


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
  data = b"caf\xe9 au lait\nvalid \xef\xbf\xbd stays\nbad \xff\xfe end\n"
  path = _write(tmp_path / "a.txt", data)
  docs, counts = _read(path)
  assert docs == [["caf\ufffd au lait", "valid \ufffd stays", "bad \ufffd\ufffd end"]]
  assert counts["invalid_utf8_lines"] == 2  # A valid U+FFFD in the input is no repair.


def test_nul_crlf_and_control_chars_are_repaired_and_counted(tmp_path):
  path = _write(tmp_path / "a.txt", b"one\r\nt\x00w\x00o\n\r\nthr\x1b[1mee\x0cend\n\tfour\n")
  docs, counts = _read(path)
  assert docs == [["one", "two"], ["thr [1mee end", "four"]]
  assert counts["crlf_lines"] == 2  # The blank CRLF line too.
  assert counts["nul_lines"] == 1
  assert counts["control_char_lines"] == 1  # The tab is kept (stripped here as edge whitespace).
  assert counts["lines_read"] == 5


def test_byte_order_mark_is_dropped(tmp_path):
  docs, _ = _read(_write(tmp_path / "a.jsonl", b'\xef\xbb\xbf{"text": "x"}\n'))
  assert docs == [["x"]]


def test_a_line_of_megabytes_is_cut_into_pieces_without_losing_text(tmp_path):
  words = random.Random(0).choices(["alpha", "beta", "γάμμα", "三", "x" * 40], k=400_000)
  line = " ".join(words)  # About 3.6 MB; one read holds up to 4 MiB.
  path = _write(tmp_path / "big.txt", f"before\n{line}\nafter\n\nnext\n".encode())
  docs, counts = _read(path)
  assert docs[1] == ["next"]
  assert docs[0][0] == "before" and docs[0][-1] == "after"
  pieces = docs[0][1:-1]
  assert len(pieces) == -(-len(line) // text.MAX_LINE_CHARS) >= 3
  assert all(len(p) <= text.MAX_LINE_CHARS for p in pieces)
  assert _squeeze("".join(pieces)) == _squeeze(line)
  assert counts["long_lines_split"] == 1


def test_a_line_over_several_reads_keeps_cut_chars_and_crlf(tmp_path, monkeypatch):
  monkeypatch.setattr(text, "MAX_LINE_CHARS", 16)  # A read is 64 bytes.
  lines = [
      "a" * 62 + "\ufffd" + "€" * 2 + "é" * 40,  # Reads end inside the U+FFFD and inside an é.
      "😀" * 16,  # 64 bytes: two reads, but only 16 chars, so not long.
      "d" * 16,  # One read of exactly 16 chars: not long.
      "x" * 63 + "\r",  # A read ends with the \r of the CRLF.
      "z" * 63 + "\rzzzzz",  # A read ends with a lone \r: a control char.
  ]
  data = "\n".join(lines).encode() + b"\n" + b"b" * 100 + b"\xff\n\nshort\n"
  docs, counts = _read(_write(tmp_path / "a.txt", data))
  assert len(docs) == 2 and docs[1] == ["short"]
  assert all(len(p) <= 16 for p in docs[0])
  want = "".join(lines[:3]) + "x" * 63 + "z" * 68 + "b" * 100 + "\ufffd"
  assert _squeeze("".join(docs[0])) == _squeeze(want)
  assert counts["long_lines_split"] == 4
  assert counts["invalid_utf8_lines"] == 1  # Only the \xff: not the valid U+FFFD, nor a cut char.
  assert counts["crlf_lines"] == 1 and counts["control_char_lines"] == 1
  assert counts["lines_read"] == 8


def test_an_oversized_jsonl_record_is_skipped_and_the_next_one_read(tmp_path, monkeypatch):
  monkeypatch.setattr(text, "MAX_LINE_CHARS", 16)
  data = json.dumps({"text": "y" * 500}) + "\n" + json.dumps({"text": "ok"}) + "\n"
  docs, counts = _read(_write(tmp_path / "a.jsonl", data.encode()))
  assert docs == [["ok"]]
  assert counts["oversized_records_skipped"] == 1
  assert counts["lines_read"] == 2


def test_a_huge_document_is_cut_and_counted(tmp_path, monkeypatch):
  monkeypatch.setattr(text, "MAX_DOCUMENT_CHARS", 10)
  docs, counts = _read(_write(tmp_path / "a.txt", b"abcdef\nghijkl\nmn\nop\n\nq\n"))
  assert docs == [["abcdef", "ghijkl"], ["mn", "op"], ["q"]]
  assert counts["long_documents_split"] == 1


def test_bad_jsonl_records_are_skipped_and_counted(tmp_path):
  lines = [
      '{"text": "good one\\r\\nsecond line\\rthird"}',
      '{"text": "a raw\ttab"}',
      '{"text": "broken',
      '[1, 2]',
      '{"body": "no text field"}',
      '{"text": 42}',
      '{"text": "   \\n\\t "}',
      '',
      '{"text": "nul\\u0000 and \\u0007 bell and \\ud800 surrogate"}',
  ]
  docs, counts = _read(_write(tmp_path / "a.jsonl.gz", "\n".join(lines).encode()))
  assert docs == [["good one", "second line", "third"], ["a raw\ttab"],
                  ["nul and   bell and \ufffd surrogate"]]
  assert counts["invalid_json_records_skipped"] == 1
  assert counts["records_without_text_skipped"] == 3
  assert counts["empty_documents_skipped"] == 1
  assert counts["nul_lines"] == counts["control_char_lines"] == counts["invalid_utf8_lines"] == 1
  docs, _ = _read(_write(tmp_path / "b.jsonl", b'{"body": "x"}\n'), text_field="body")
  assert docs == [["x"]]


@pytest.mark.parametrize("name,data",
                         [("e.txt", b""), ("e.jsonl.gz", b""), ("w.txt", b"\n \n\t\n")])
def test_a_file_without_documents_is_counted_empty(tmp_path, name, data):
  docs, counts = _read(_write(tmp_path / name, data))
  assert docs == [] and counts["empty_files"] == 1 and counts["documents"] == 0


def test_missing_truncated_and_fake_gzip_files_are_user_errors(tmp_path):
  rng = random.Random(0)
  data = "".join(f"line {rng.random()}\n" + "\n" * (i % 10 == 9) for i in range(100_000))
  truncated = tmp_path / "cut.txt.gz"
  truncated.write_bytes(gzip.compress(data.encode())[:-1000])
  got = []
  with pytest.raises(UserError, match="cut.txt.gz' is truncated or corrupt.*Re-create"):
    for doc in text.iter_documents(str(truncated), counts=text.Counts()):
      got.append(doc)
  assert len(got) > 5000  # The error came in the middle of the stream.
  (tmp_path / "fake.jsonl.gz").write_bytes(b'{"text": "not gzip"}\n')
  with pytest.raises(UserError, match="fake.jsonl.gz' is truncated or corrupt"):
    _read(str(tmp_path / "fake.jsonl.gz"))
  with pytest.raises(UserError, match="missing.txt' does not exist"):
    _read(str(tmp_path / "missing.txt"))
  with pytest.raises(UserError, match="a.csv"):
    _read(str(tmp_path / "a.csv"))


def test_resolve_inputs(tmp_path, monkeypatch):
  for name in ("b.txt", "a.jsonl.gz", "c.txt.gz", "notes.md"):
    (tmp_path / name).write_bytes(b"x\n")
  (tmp_path / "sub.txt").mkdir()
  monkeypatch.setenv("HOME", str(tmp_path))
  got = text.resolve_inputs(f"{tmp_path}/*.txt*, ~/b.txt,,{tmp_path}/a.jsonl.gz")
  assert got == sorted(str(tmp_path / n) for n in ("a.jsonl.gz", "b.txt", "c.txt.gz"))
  assert text.resolve_inputs("") == []
  with pytest.raises(UserError, match="nothing_here"):
    text.resolve_inputs(f"{tmp_path}/b.txt,{tmp_path}/nothing_here*")
  with pytest.raises(UserError, match="sub.*only directories"):
    text.resolve_inputs(f"{tmp_path}/sub*")
  with pytest.raises(UserError, match=r"notes\.md.*\.jsonl\.gz"):
    text.resolve_inputs(f"{tmp_path}/*")


def test_sentences_in_several_scripts():
  s = text.split_sentences
  assert s("It costs 3.14 dollars, e.g. a lot. Really? \"Yes.\" (Sure!) Next") == [
      "It costs 3.14 dollars, e.g. a lot.", "Really?", "\"Yes.\"", "(Sure!)", "Next"]
  assert s("今天天气很好。我们去公园吧！你呢？") == ["今天天气很好。", "我们去公园吧！", "你呢？"]
  assert s("「你好。」他说。") == ["「你好。」", "他说。"]
  assert s("यह अच्छा है। वह भी ठीक है॥ और फिर") == ["यह अच्छा है।", "वह भी ठीक है॥", "और फिर"]
  assert s("هل أنت بخير؟ نعم۔ شكرا") == ["هل أنت بخير؟", "نعم۔", "شكرا"]
  assert s("Это т.е. пример. Второе.") == ["Это т.е. пример.", "Второе."]
  assert s("  ") == [] and s("") == []


def test_a_sentence_over_max_chars_is_cut_and_counted():
  counts = text.Counts()
  pieces = text.split_sentences("x" * 10_000, counts=counts)
  assert pieces == ["x" * 2000] * 5 and counts["sentences_split_by_length"] == 1
  words = " ".join(["alpha", "beta", "gamma"] * 1000) + ". Short one."
  pieces = text.split_sentences(words, max_chars=100, counts=counts)
  assert pieces[-1] == "Short one." and all(50 <= len(p) <= 100 for p in pieces[:-2])
  assert " ".join(pieces) == words  # Cut at spaces, never inside a word.
  assert counts["sentences_split_by_length"] == 2


def test_split_sentences_loses_no_text():
  rng = random.Random(0)
  alphabet = list("abcXYZ019 .!?\"')]…。！？．।॥؟۔「」『』\t\n") + ["  ", "3.14", "e.g. a", "漢字"]
  for _ in range(2000):
    paragraph = "".join(rng.choices(alphabet, k=rng.randrange(0, 80)))
    max_chars = rng.choice([1, 2, 5, 2000])
    got = text.split_sentences(paragraph, max_chars=max_chars)
    assert all(g and g == g.strip() and len(g) <= max_chars for g in got), (paragraph, got)
    assert _squeeze("".join(got)) == _squeeze(paragraph), (paragraph, got)


def test_the_ascii_sentence_pattern_agrees_with_the_general_one():
  rng = random.Random(1)
  alphabet = list("abcXYZ019 .!?\"')]\t\n") + ["  ", "3.14", "e.g. a"]
  for _ in range(2000):
    paragraph = "".join(rng.choices(alphabet, k=rng.randrange(0, 60)))
    assert text._ASCII_END.split(paragraph) == text._SENTENCE_END.split(paragraph), paragraph
