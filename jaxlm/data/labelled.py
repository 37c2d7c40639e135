"""Labelled examples for classification fine-tuning: files, label ids, encoding and batches.

A file is JSONL (one object per line), TSV or CSV (a header row), chosen by its extension, with
the columns `text`, optional `text_b` (a second segment: sentence pairs) and `label` (a string,
or an integer in JSON); other columns are ignored. The training file fixes the classes: its
labels, sorted (numerically when every label is an integer, so labels 0..C-1 keep their ids),
get ids 0..C-1, saved as `labels.json` beside the run.

Each example is encoded as pretraining's `pairs` format lays out a pair: `[CLS] a [SEP]` or
`[CLS] a [SEP] b [SEP]`, token types 0 up to the first [SEP] and 1 after it, [PAD] after the end,
the longer segment cut first when the pair is too long (BERT's `_truncate_seq_pair`). Batches
hold `input_ids` and `token_type_ids` (int32 [B, L], what the encoder reads), `labels` (int32
[B]) and `label_weights` (float32 [B], 0 on padding rows).

`LabelledLoader` has `BatchLoader`'s interface: the training stream visits example
`perm_e(g % N)` for global row `g` (epoch `e = g // N`, `perm_e` a permutation keyed by the seed
and the epoch), so a batch is a pure function of the step; the eval set is the file in order,
its last batch filled with weight-0 rows.
"""

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np

from jaxlm.data import loader as loader_lib
from jaxlm.data.tokenizer import CLS_ID, PAD_ID, SEP_ID, Tokenizer
from jaxlm.errors import UserError, closest

Batch = dict[str, np.ndarray]
EXTENSIONS = {".jsonl": "jsonl", ".tsv": "tsv", ".csv": "csv"}
COLUMNS = ("text", "text_b", "label")
LABELS_FILE = "labels.json"
MIN_SEQ_LEN = 8  # As the pretraining formats.
_NAMING = "Name them text, label and (for sentence pairs) text_b."
_INTEGER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class Example:
  text: str
  text_b: str | None  # None: a single segment.
  label: str  # An integer label of a JSON file as its decimal string.
  line: int  # Where the example starts in its file, from 1.


def read_examples(path: str) -> list[Example]:
  """The examples of a JSONL, TSV or CSV file, in file order; UserError on any bad line."""
  return _read(path)[1]


def _read(path: str) -> tuple[bytes, list[Example]]:
  kind = _kind(path)
  raw = _read_bytes(path)
  text = _decode(path, raw)
  examples = list(_read_jsonl(path, text) if kind == "jsonl" else _read_table(path, text, kind))
  if not examples:
    raise UserError(f"{path}: the file has no examples. Give it one example per line"
                    f"{' after the header row' if kind != 'jsonl' else ''}.")
  return raw, examples


def _kind(path: str) -> str:
  extension = os.path.splitext(path)[1].lower()
  if extension not in EXTENSIONS:
    raise UserError(f"{path}: unknown extension '{extension}'. Labelled data is read from "
                    f"{', '.join(EXTENSIONS)} files; rename the file to say which it is.")
  return EXTENSIONS[extension]


def _read_bytes(path: str) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise UserError(f"{path}: no such file. Check the path.") from None
  except OSError as e:
    raise UserError(f"{path}: cannot be read ({e.strerror}).") from None


def _decode(path: str, raw: bytes) -> str:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise UserError(
        f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}). Save the file as UTF-8, "
        "e.g. `iconv -f latin1 -t utf-8 in.tsv > out.tsv`.") from None
  return text.removeprefix("\ufeff")  # A byte-order mark some editors write.


def _read_jsonl(path: str, text: str) -> Iterator[Example]:
  # Split on "\n" only: str.splitlines would also split at U+2028, which JSON strings may hold.
  for number, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}). Each line "
                      'must be one object, e.g. {"text": "...", "label": "..."}.') from None
    if not isinstance(record, dict):
      raise UserError(f"{path}:{number}: a JSON {type(record).__name__}, not an object. Each "
                      'line must be one object, e.g. {"text": "...", "label": "..."}.')
    for column in ("text", "label"):
      if column not in record:
        raise UserError(f"{path}:{number}: no '{column}' key; the object has "
                        f"{sorted(record)}.{closest(column, record)} {_NAMING}")
    yield _example(path, number, record["text"], record.get("text_b"), record["label"])


def _read_table(path: str, text: str, kind: str) -> Iterator[Example]:
  if kind == "tsv":  # GLUE-style TSV: no quoting, so a lone '"' in a sentence stays text.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
  else:
    reader = csv.reader(io.StringIO(text, newline=""))
  header, columns, start = None, {}, 1
  try:
    for row in reader:
      line, start = start, reader.line_num + 1  # Where this record began; where the next does.
      if not any(field.strip() for field in row):
        continue
      if header is None:
        header = [name.strip() for name in row]
        columns = _columns(path, line, header)
        continue
      if len(row) != len(header):
        hint = " (a tab inside a text?)" if kind == "tsv" else " (an unquoted comma?)"
        raise UserError(f"{path}:{line}: {len(row)} fields, but the header has {len(header)}"
                        f"{hint}. Fix the line so it has one field per column.")
      text_b = row[columns["text_b"]] if "text_b" in columns else None
      yield _example(path, line, row[columns["text"]], text_b, row[columns["label"]])
  except csv.Error as e:
    raise UserError(f"{path}:{reader.line_num}: not valid {kind.upper()} ({e}).") from None


def _columns(path: str, line: int, header: list[str]) -> dict[str, int]:
  """Where the known columns are, checked: the required ones present, none twice."""
  for name in COLUMNS:
    if header.count(name) > 1:
      raise UserError(f"{path}:{line}: the header names '{name}' twice. Keep one.")
  for name in ("text", "label"):
    if name not in header:
      raise UserError(f"{path}:{line}: the header has no '{name}' column; its columns are "
                      f"{header}.{closest(name, header)} {_NAMING}")
  return {name: header.index(name) for name in COLUMNS if name in header}


def _example(path: str, line: int, text, text_b, label) -> Example:
  for column, value in (("text", text), ("text_b", text_b)):
    if value is None and column == "text_b":
      continue
    if not isinstance(value, str):
      raise UserError(f"{path}:{line}: '{column}' is a {type(value).__name__}, not a string.")
    if not value.strip():
      raise UserError(f"{path}:{line}: empty '{column}'. Remove the example or give it text.")
  if isinstance(label, int) and not isinstance(label, bool):
    label = str(label)
  if not isinstance(label, str):
    raise UserError(f"{path}:{line}: the label is a {type(label).__name__}; use a string or an "
                    "integer.")
  label = label.strip()
  if not label:
    raise UserError(f"{path}:{line}: empty 'label'. Give every example its label.")
  return Example(text, text_b, label, line)


def _sort_key(labels: Sequence[str]):
  """Numeric order when every label is an integer (so "2" < "10"), else string order."""
  if all(_INTEGER.fullmatch(label) for label in labels):
    return lambda label: (int(label), label)
  return lambda label: label


@dataclasses.dataclass(frozen=True)
class LabelMap:
  """The classes of a run: label `labels[i]` has id i."""

  labels: tuple[str, ...]
  source: str = dataclasses.field(default="", compare=False)  # The training file, for messages.

  @property
  def num_classes(self) -> int:
    return len(self.labels)

  @classmethod
  def from_examples(cls, examples: Sequence[Example], path: str) -> "LabelMap":
    """The sorted labels of a training file; it needs at least two."""
    if not examples:
      raise UserError(f"{path}: the file has no examples.")
    counts = Counter(e.label for e in examples)
    if len(counts) < 2:
      raise UserError(
          f"{path}: all {len(examples)} examples (lines {examples[0].line}-{examples[-1].line}) "
          f"have the label '{examples[0].label}'; a classifier needs at least two classes. "
          "Check that the file holds every class, and that 'label' is the right column.")
    labels = list(counts)
    return cls(tuple(sorted(labels, key=_sort_key(labels))), source=path)

  def ids(self, examples: Sequence[Example], path: str) -> np.ndarray:
    """int32 [N] label ids; UserError naming the line of a label the training file lacks."""
    index = {label: i for i, label in enumerate(self.labels)}
    out = np.empty(len(examples), np.int32)
    for k, example in enumerate(examples):
      if example.label not in index:
        shown = list(self.labels[:20]) + (["..."] if len(self.labels) > 20 else [])
        source = f" ({self.source})" if self.source else ""
        raise UserError(
            f"{path}:{example.line}: label '{example.label}' is not among the "
            f"{self.num_classes} labels of the training file{source}: {shown}."
            f"{closest(example.label, self.labels)} Fix the label, or add examples of it to the "
            "training file (the classifier has one output per training label).")
      out[k] = index[example.label]
    return out

  def save(self, path: str) -> None:
    """Writes `{"labels": [...], "source": ...}` atomically."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, prefix=".labels.tmp-",
                                     encoding="utf-8") as f:
      json.dump({"labels": list(self.labels), "source": self.source}, f, indent=2,
                ensure_ascii=False)
      f.write("\n")
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)

  @classmethod
  def load(cls, path: str) -> "LabelMap":
    raw = _read_bytes(path)
    try:
      saved = json.loads(_decode(path, raw))
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}). Restore the file written "
                      "by the run, or delete it to rebuild it from the training file.") from None
    labels = saved.get("labels") if isinstance(saved, dict) else None
    if (not isinstance(labels, list) or len(labels) < 2 or len(set(labels)) != len(labels)
        or not all(isinstance(label, str) and label for label in labels)):
      raise UserError(f"{path}: not a label map: it needs {{\"labels\": [...]}} with at least "
                      "two distinct non-empty strings. Restore the file written by the run.")
    return cls(tuple(labels), source=str(saved.get("source", "")))


def truncate_pair(length_a: int, length_b: int, budget: int) -> tuple[int, int]:
  """Lengths after cutting the longer segment one token at a time (b on a tie) until both fit in
  `budget`, as BERT's `_truncate_seq_pair`, in closed form."""
  if length_a + length_b <= budget:
    return length_a, length_b
  kept_a = min(length_a, max(budget - length_b, -(-budget // 2)))
  return kept_a, min(length_b, budget - kept_a)


def encode(tokenizer: Tokenizer, examples: Sequence[Example], seq_len: int) -> Batch:
  """`input_ids` and `token_type_ids` (int32 [N, seq_len]) and `truncated` (bool [N])."""
  if seq_len < MIN_SEQ_LEN:
    raise UserError(f"seq_len is {seq_len}; examples need at least {MIN_SEQ_LEN} positions.")
  pieces_a = tokenizer.encode_batch([e.text for e in examples])
  pairs = [k for k, e in enumerate(examples) if e.text_b is not None]
  pieces_b: list[list[int] | None] = [None] * len(examples)
  for k, pieces in zip(pairs, tokenizer.encode_batch([examples[k].text_b for k in pairs])):
    pieces_b[k] = pieces
  ids = np.full((len(examples), seq_len), PAD_ID, np.int32)
  types = np.zeros((len(examples), seq_len), np.int32)
  truncated = np.zeros(len(examples), bool)
  for k, (a, b) in enumerate(zip(pieces_a, pieces_b)):
    if b is None:
      row = [CLS_ID, *a[:seq_len - 2], SEP_ID]
      truncated[k] = len(a) > seq_len - 2
    else:
      keep_a, keep_b = truncate_pair(len(a), len(b), seq_len - 3)
      row = [CLS_ID, *a[:keep_a], SEP_ID, *b[:keep_b], SEP_ID]
      types[k, keep_a + 2:len(row)] = 1
      truncated[k] = keep_a + keep_b < len(a) + len(b)
    ids[k, :len(row)] = row
  return {"input_ids": ids, "token_type_ids": types, "truncated": truncated}


@dataclasses.dataclass(frozen=True)
class LabelledSet:
  """One encoded file: every example's row, in file order."""

  path: str
  label_map: LabelMap
  input_ids: np.ndarray  # int32 [N, seq_len]
  token_type_ids: np.ndarray  # int32 [N, seq_len]
  labels: np.ndarray  # int32 [N]
  fingerprint: str  # Of the file's bytes and seq_len.
  description: dict

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def seq_len(self) -> int:
    return self.input_ids.shape[1]


def load_set(path: str, tokenizer: Tokenizer, seq_len: int,
             label_map: LabelMap | None = None) -> LabelledSet:
  """Reads and encodes a file. Without `label_map` (the training file) its own labels make one;
  with it (an eval file, or a resumed run's `labels.json`) every label must be in it."""
  raw, examples = _read(path)
  if label_map is None:
    label_map = LabelMap.from_examples(examples, path)
  labels = label_map.ids(examples, path)
  encoded = encode(tokenizer, examples, seq_len)
  fingerprint = hashlib.sha256(raw + f"\nseq_len={seq_len}".encode()).hexdigest()[:32]
  counts = Counter(e.label for e in examples)
  description = dict(
      file=os.path.abspath(path), format=_kind(path), examples=len(examples),
      pairs=sum(e.text_b is not None for e in examples), seq_len=seq_len,
      truncated=int(encoded["truncated"].sum()), classes=label_map.num_classes,
      label_counts={label: counts.get(label, 0) for label in label_map.labels},
      fingerprint=fingerprint)
  return LabelledSet(path, label_map, encoded["input_ids"], encoded["token_type_ids"], labels,
                     fingerprint, description)


class LabelledRows:
  """A `LabelledSet` as the format a `BatchLoader` reads: example i is the file's row i."""

  def __init__(self, data: LabelledSet):
    self.data, self.seq_len = data, data.seq_len

  def __len__(self) -> int:
    return len(self.data)

  def examples(self, indices: np.ndarray, keys: np.ndarray) -> Batch:
    d = self.data
    return {"input_ids": d.input_ids[indices].astype(np.int32),
            "token_type_ids": d.token_type_ids[indices].astype(np.int32),
            "labels": d.labels[indices].astype(np.int32),
            "label_weights": np.ones(len(indices), np.float32)}

  def padding(self, rows: int) -> Batch:
    """Rows of weight 0 that fill the last eval batch."""
    return {"input_ids": np.full((rows, self.seq_len), PAD_ID, np.int32),
            "token_type_ids": np.zeros((rows, self.seq_len), np.int32),
            "labels": np.zeros(rows, np.int32), "label_weights": np.zeros(rows, np.float32)}


class LabelledLoader(loader_lib.BatchLoader):
  """The pretraining loader over a `LabelledSet`: this process's rows of each global batch.

  `train=True`: an endless stream, reshuffled each epoch by a permutation keyed by (seed, epoch),
  so `batch(step)` depends on the step alone and a resumed run sees the same batches.
  `train=False`: the set once in file order, `steps` batches, the last one filled with padding
  rows of weight 0.
  """

  def __init__(self, data: LabelledSet, *, global_batch_size: int, train: bool, seed: int = 0,
               process_index: int = 0, process_count: int = 1):
    super().__init__(LabelledRows(data), global_batch_size=global_batch_size, transforms=(),
                     seed=seed, stream_id=loader_lib.TRAIN_STREAM, process_index=process_index,
                     process_count=process_count, num_examples=None if train else len(data),
                     shuffle=train)
    self.data = data

  @property
  def fingerprint(self) -> str:
    return self.data.fingerprint

  @property
  def description(self) -> dict:
    return self.data.description
