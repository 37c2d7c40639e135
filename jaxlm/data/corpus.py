"""Reading plain-text corpora: one paragraph per line, a blank line ends a document.

Files may be gzip-compressed (`.gz`). With no files configured, the embedded default corpus
(The Jargon File, version 4.4.7, public domain) is used, split into train and eval documents.
"""

import glob
import gzip
import importlib.resources
import os
import re
import zlib

import numpy as np

from jaxlm.errors import UserError

Document = list[str]  # Paragraphs.

# Sentence boundary: end punctuation, spaces, then something that starts a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


def default_corpus_path() -> str:
  return str(importlib.resources.files("jaxlm") / "assets" / "jargon.txt.gz")


def resolve_files(spec: str) -> list[str]:
  """Expands a comma-separated list of paths and globs; every entry must match a file."""
  paths = []
  for entry in (e.strip() for e in spec.split(",")):
    if not entry:
      continue
    matches = sorted(glob.glob(os.path.expanduser(entry)))
    if not matches:
      raise UserError(
          f"Data file not found: '{entry}' matches no file. Check the path in "
          "data.train_files / data.eval_files (comma-separated paths or globs), or leave "
          "data.train_files empty to use the embedded default corpus."
      )
    paths.extend(m for m in matches if os.path.isfile(m))
  return paths


def read_documents(paths: list[str]) -> list[Document]:
  """Reads every file into documents; each document is a list of non-empty paragraphs."""
  documents: list[Document] = []
  for path in paths:
    opener = gzip.open if path.endswith(".gz") else open
    try:
      with opener(path, "rb") as f:
        raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
      raise UserError(f"Cannot read data file '{path}': {e}.") from None
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise UserError(
          f"Data file '{path}' is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}). "
          "Convert it first, e.g. `iconv -f latin1 -t utf-8 IN > OUT`."
      ) from None
    current: Document = []
    for line in text.splitlines():
      line = line.strip()
      if line:
        current.append(line)
      elif current:
        documents.append(current)
        current = []
    if current:
      documents.append(current)
  return documents


def split_sentences(paragraph: str) -> list[str]:
  """A cheap sentence splitter, so segment pairs can break inside long paragraphs."""
  return [s for s in _SENTENCE_END.split(paragraph) if s]


def split_train_eval(
    documents: list[Document], eval_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
  """Holds out whole documents (never parts of one) for evaluation, chosen by `seed`."""
  if len(documents) < 2:
    raise UserError(
        f"The corpus has {len(documents)} document(s); holding out an eval split needs at "
        "least 2 (a blank line ends a document), or set data.eval_files."
    )
  n_eval = min(len(documents) - 1, max(1, round(eval_fraction * len(documents))))
  order = np.random.default_rng(seed).permutation(len(documents))
  held_out = set(order[:n_eval].tolist())
  train = [d for i, d in enumerate(documents) if i not in held_out]
  evaluation = [d for i, d in enumerate(documents) if i in held_out]
  return train, evaluation
