"""Streaming text reader of corpus preparation: files in, repaired documents out, bounded memory.

`python -m jaxlm.prepare` reads 10-100 GB corpora nobody has checked: invalid UTF-8, NUL bytes,
CRLF, lines of gigabytes, broken JSON. Each problem is repaired or skipped and counted in a
`Counts` (merged into stats.json), so hostile input never crashes the run and no text is lost
silently. Files are read with `readline(limit)`, so no line, record or document has to fit in
memory whole; a missing, unreadable or corrupt file is a `UserError` naming it.
"""

import codecs
import collections
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator

from jaxlm.errors import UserError

Counts = collections.Counter  # Reason -> number of lines/records/files, merged into stats.json.

MAX_LINE_CHARS = 1 << 20  # A physical line longer than this is cut into pieces of at most this.
MAX_DOCUMENT_CHARS = 1 << 24  # A .txt document is cut after this many chars (counted), for memory.
SUPPORTED = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")

# Control bytes are found by deleting them (several times faster than a regex search); a decoded
# piece or JSON text that may need a repair is found by _DIRTY.
_CONTROL_BYTES = bytes([*range(0, 9), *range(11, 32)])
_DIRTY = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff\ufffd]")
_CONTROL = re.compile("[\x01-\x08\x0a-\x1f]")  # C0 controls but NUL (removed) and tab (kept).
_SURROGATE = re.compile("[\ud800-\udfff]")  # Only JSON escapes make these; they cannot be encoded.
_LINE_BREAK = re.compile("\r\n|\r|\n")
_REPLACEMENT = "\ufffd".encode()  # A valid U+FFFD in the input is not a repair.
_JSON = json.JSONDecoder(strict=False)  # Raw tabs inside strings are common and harmless.

# Sentence ends. ASCII . ! ?, the ellipsis and Arabic marks end a sentence only before whitespace
# that is not followed by a lowercase letter (Latin, Greek, Cyrillic), so "3.14", "e.g. a" and
# "Yahoo! is" stay whole while "U.S. Army" is split: cheap, script-agnostic, never perfect. The
# CJK/fullwidth marks and Devanagari dandas end a sentence directly (those scripts put no space
# after them) when they are the last of a run of marks. Closing quotes and brackets stay with the
# sentence they close. Each pattern captures a sentence end and eats the whitespace after it.
# (`[m][m]*`, not `[m]+`, keeps the regex engine's fast scan for the first character.)
_DIRECT = "\u3002\uff01\uff1f\uff0e\uff61\u0964\u0965"
_MARKS = ".!?\u2026\u061f\u06d4" + _DIRECT
_CLOSE = "\"'\u201d\u2019)\uff09\\]\u300d\u300f\u3011\u300b\u00bb"
_LOWER = "a-z\u00df-\u00f6\u00f8-\u00ff\u03ac-\u03ce\u0430-\u045f"
_SENTENCE_END = re.compile(f"([{_MARKS}][{_MARKS}]*"
                           f"(?:(?<=[{_DIRECT}])[{_CLOSE}]*|[{_CLOSE}]*(?=\\s+(?![\\s{_LOWER}]))))\\s*")
_ASCII_END = re.compile(r"""([.!?][.!?]*["')\]]*(?=\s+(?![\sa-z])))\s*""")  # Same on ASCII; faster.
_LAST_SPACE = re.compile(r".*\s", re.DOTALL)  # Matched within a window: its end is past the last.
_SPACES = re.compile(r"\s*")


def resolve_inputs(spec: str) -> list[str]:
  """Comma-separated paths/globs (with ~ expansion) -> sorted, de-duplicated regular files.

  Each entry must match at least one file, else UserError naming the entry. Supported names end
  in .txt, .txt.gz, .jsonl, .jsonl.gz (case-insensitive; anything else: UserError naming the
  file and the supported kinds). An empty spec gives [].
  """
  files = set()
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    pattern = os.path.expanduser(entry)
    found = glob.glob(pattern, recursive=True)
    matches = [m for m in found if os.path.isfile(m)]
    if os.path.isfile(pattern):  # A name holding glob characters such as '[' matches itself.
      matches.append(pattern)
    if not matches:
      what = "only directories or special files" if found else "no file"
      raise UserError(f"Input '{entry}' matches {what}. Give comma-separated paths or globs of "
                      f"files ending in {', '.join(SUPPORTED)}.")
    files.update(os.path.normpath(m) for m in matches)
  paths = sorted(files)
  for path in paths:
    _is_jsonl(path)  # Raises on an unsupported name.
  return paths


def iter_documents(path: str, *, text_field: str = "text", counts: Counts) -> Iterator[list[str]]:
  """Yields documents as lists of paragraphs (stripped, non-empty str), streaming.

  .txt/.txt.gz: one paragraph per line, a blank (whitespace-only) line ends a document; a line
    over MAX_LINE_CHARS becomes several paragraphs, a document over MAX_DOCUMENT_CHARS several
    documents. .jsonl/.jsonl.gz: one document per line, a JSON object whose `text_field` holds
    the text; paragraphs are its non-empty lines (split on \\n, \\r\\n, \\r).
  Repairs and skips are added to `counts`, as are `documents`, `lines_read` and `empty_files`.
  """
  jsonl, n = _is_jsonl(path), 0
  try:  # A gzip file under a C buffer: a faster readline.
    gz = path.lower().endswith(".gz")
    with io.BufferedReader(gzip.GzipFile(path), 1 << 20) if gz else open(path, "rb", 1 << 20) as f:
      lines = _lines(f, counts, split_long=not jsonl)
      docs = _jsonl_documents(lines, text_field, counts) if jsonl else _txt_documents(lines, counts)
      for doc in docs:
        n += 1
        counts["documents"] += 1
        yield doc
  except FileNotFoundError:
    raise UserError(f"Input file '{path}' does not exist (moved or deleted?).") from None
  except PermissionError:
    raise UserError(f"Cannot read input file '{path}': permission denied.") from None
  except (EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise UserError(f"Input file '{path}' is truncated or corrupt ({e}). Re-create it (download "
                    "or compress it again); `gzip -t FILE` checks a gzip file.") from None
  except OSError as e:
    raise UserError(f"Cannot read input file '{path}': {e}.") from None
  if n == 0:
    counts["empty_files"] += 1


def split_sentences(paragraph: str, *, max_chars: int = 2000,
                    counts: Counts | None = None) -> list[str]:
  """Sentences of one paragraph, for any script (see _SENTENCE_END), none over `max_chars`.

  A longer sentence is cut at its last whitespace in the second half of the window, else hard at
  `max_chars`, and counted once under `sentences_split_by_length`. Only whitespace is dropped:
  the sentences hold every other character of the paragraph, in order.
  """
  if max_chars < 1:
    raise ValueError(f"max_chars must be positive, got {max_chars}")
  parts = (_ASCII_END if paragraph.isascii() else _SENTENCE_END).split(paragraph)
  if len(parts) == 1:
    sentences = [s] if (s := paragraph.strip()) else []
  else:
    parts.append("")  # Now pairs: the text of a sentence, then its end.
    sentences = [s for text, end in zip(parts[::2], parts[1::2]) if (s := (text + end).strip())]
  if max(map(len, sentences), default=0) <= max_chars:
    return sentences
  if counts is not None:
    counts["sentences_split_by_length"] += sum(len(s) > max_chars for s in sentences)
  return [p for s in sentences for p in (_cut(s, max_chars) if len(s) > max_chars else (s,))]


def _cut(s: str, max_chars: int) -> list[str]:
  """Cuts a stripped string into pieces of at most `max_chars`; indices, so linear time."""
  pieces, start = [], 0
  while len(s) - start > max_chars:
    m = _LAST_SPACE.match(s, start + max_chars // 2, start + max_chars + 1)
    cut = m.end() - 1 if m else start + max_chars
    pieces.append(s[start:cut].rstrip())
    start = _SPACES.match(s, cut).end()
  pieces.append(s[start:])
  return pieces


def _is_jsonl(path: str) -> bool:
  name = path.lower()
  if name.endswith((".jsonl", ".jsonl.gz")):
    return True
  if name.endswith((".txt", ".txt.gz")):
    return False
  raise UserError(f"Unsupported input file '{path}': supported kinds are {', '.join(SUPPORTED)} "
                  "(text with one paragraph per line, or JSON lines with one document each).")


def _repair(text: str, found: set[str]) -> str:
  """Repairs a line, piece or paragraph holding control chars; adds each kind made to `found`."""
  if "\x00" in text:
    text = text.replace("\x00", "")
    found.add("nul_lines")
  if text.endswith("\n"):
    text = text[:-1]
  if text.endswith("\r"):
    text = text.rstrip("\r")
    found.add("crlf_lines")
  if _CONTROL.search(text):
    text = _CONTROL.sub(" ", text)
    found.add("control_char_lines")
  if _SURROGATE.search(text):
    text = _SURROGATE.sub("\ufffd", text)
    found.add("invalid_utf8_lines")
  return text


def _lines(f: io.BufferedReader, counts: Counts, *,
           split_long: bool) -> Iterator[str | Iterator[str] | None]:
  """Yields each physical line of binary file `f`, decoded and repaired (maybe still ending \\n).

  If `split_long`, a line of over MAX_LINE_CHARS bytes comes as an iterator of pieces; else a
  line that does not fit in one read comes as None, read past unparsed (a record cannot be cut).
  """
  limit, max_chars = 4 * MAX_LINE_CHARS, MAX_LINE_CHARS  # Bytes for MAX_LINE_CHARS of any script.
  readline, n = f.readline, 0
  try:
    while raw := readline(limit):
      n += 1
      if split_long and len(raw) > max_chars + 1:  # Over MAX_LINE_CHARS bytes, \n aside.
        pieces = _long_line(raw, readline, limit, counts)
        yield pieces
        for _ in pieces:  # Reads what the consumer left, so the next line starts right.
          pass
      elif raw[-1] == 10 or len(raw) < limit:  # The whole line in one read: the fast path.
        try:
          text = raw.decode()
        except UnicodeDecodeError:
          text = raw.decode("utf-8", "replace")
          counts["invalid_utf8_lines"] += 1
        if n == 1 and text.startswith("\ufeff"):  # A byte order mark is no text.
          text = text[1:]
        if len(raw.translate(None, _CONTROL_BYTES)) != len(raw):
          found = set()
          text = _repair(text, found)
          counts.update(found)
        yield text
      else:
        while len(raw) == limit and raw[-1] != 10:
          raw = readline(limit)
        yield None
  finally:
    counts["lines_read"] += n


def _long_line(raw: bytes, readline: Callable[[int], bytes], limit: int,
               counts: Counts) -> Iterator[str]:
  """Decodes a long line, read by read, into pieces of at most MAX_LINE_CHARS chars.

  The incremental decoder keeps a character cut by a read for the next one; a \\r ending a read
  waits for the next one too, since only at the end of the line is it part of a CRLF.
  """
  max_chars = MAX_LINE_CHARS
  decoder = codecs.getincrementaldecoder("utf-8")("replace")
  found: set[str] = set()
  buf = carry = ""
  tail, pieces = b"", 0
  while True:
    done = len(raw) < limit or raw[-1] == 10
    text = carry + decoder.decode(raw, final=done)
    if "\ufffd" in text and text.count("\ufffd") > (tail + raw).count(_REPLACEMENT):
      found.add("invalid_utf8_lines")
    tail, carry = raw[-2:], ""
    if done and text.endswith("\n"):
      text = text[:-1]
    elif not done and text.endswith("\r"):
      carry, text = "\r", text[:-1]
    if _DIRTY.search(text):
      text = _repair(text, found)
    buf += text
    while len(buf) >= max_chars:
      pieces += 1
      yield buf[:max_chars]
      buf = buf[max_chars:]
    if done:
      break
    raw = readline(limit)
  if buf:
    pieces += 1
    yield buf
  if pieces > 1:
    found.add("long_lines_split")
  counts.update(found)


def _txt_documents(lines: Iterable, counts: Counts) -> Iterator[list[str]]:
  doc, size, was_cut = [], 0, False
  for line in lines:
    if line.__class__ is str:
      if not (paragraph := line.strip()):  # A blank line ends a document.
        if doc:
          yield doc
        doc, size, was_cut = [], 0, False
        continue
      pieces = (paragraph,)
    else:  # The pieces of a long line; a blank piece ends nothing.
      pieces = (s for piece in line if (s := piece.strip()))
    for paragraph in pieces:
      doc.append(paragraph)
      size += len(paragraph)
      if size >= MAX_DOCUMENT_CHARS:
        if not was_cut:  # Counted once per document, however many times it is cut.
          counts["long_documents_split"] += 1
        yield doc
        doc, size, was_cut = [], 0, True
  if doc:
    yield doc


def _jsonl_documents(lines: Iterable, text_field: str, counts: Counts) -> Iterator[list[str]]:
  for line in lines:
    if line is None:
      counts["oversized_records_skipped"] += 1
      continue
    if not line or line.isspace():
      continue  # A blank line holds no record and no text.
    try:
      record = _JSON.decode(line)
    except (ValueError, RecursionError):
      counts["invalid_json_records_skipped"] += 1
      continue
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):  # Also a valid JSON value that is not an object.
      counts["records_without_text_skipped"] += 1
      continue
    paragraphs = _LINE_BREAK.split(text)
    if _DIRTY.search(text):  # Escapes such as \u0000 only appear once parsed.
      found = set()
      paragraphs = [_repair(p, found) for p in paragraphs]
      counts.update(found)
    if doc := [s for p in paragraphs if (s := p.strip())]:
      yield doc
    else:
      counts["empty_documents_skipped"] += 1
