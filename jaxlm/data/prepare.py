"""Text files to a prepared folder: a tokenizer, token shards, `stats.json` and a manifest.

Three stages, each with memory that does not grow with the corpus:
1. unless a tokenizer is given, a reservoir sample of at most `sample_sentences` sentences
   (one streaming pass) trains the sentencepiece model;
2. the main process streams documents (repairing and counting bad input, `jaxlm.data.text`) in
   chunks of about a megabyte to `num_workers` processes that split and encode them, at most a
   few chunks in flight;
3. the main process appends the results, in input order, to the shards of the split chosen by a
   hash of each document's text, so adding a file never moves an existing document.

The folder is complete only once `manifest.json` is written, last and atomically. A stopped
prepare leaves a `.prepare-state.json`; running the command again keeps its trained tokenizer and
redoes the shards.
"""

import collections
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator

import numpy as np
import sentencepiece as spm
from absl import logging
from tqdm import tqdm

from jaxlm.data import shards, text, tokenizer as tokenizer_lib
from jaxlm.errors import UserError

STATE = ".prepare-state.json"
_SHARD_FILE = re.compile(r"^(train|eval)-\d{5}\.(tokens|sentences\.npy|documents\.npy)$")
_CHUNK_BYTES = 1 << 20  # Text per task sent to a worker.


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
  inputs: str  # Comma-separated paths / globs.
  output: str
  vocab_size: int = 8192
  tokenizer: str = ""  # An existing jaxlm sentencepiece model; "" = train one.
  model_type: str = "unigram"
  eval_fraction: float = 0.01
  num_workers: int = 0  # 0 = tokenize in this process.
  text_field: str = "text"
  shard_tokens: int = 1 << 27
  max_sentence_chars: int = 2000
  sample_sentences: int = 1_000_000  # Tokenizer training sample.
  overwrite: bool = False  # Replace a complete folder prepared from other inputs.

  def recipe(self) -> dict:
    """What decides the output, besides the input files themselves."""
    tokenizer = _file_digest(self.tokenizer) if self.tokenizer else None
    return dict(vocab_size=None if tokenizer else self.vocab_size, tokenizer_sha256=tokenizer,
                model_type=None if tokenizer else self.model_type, text_field=self.text_field,
                eval_fraction=self.eval_fraction, max_sentence_chars=self.max_sentence_chars,
                sample_sentences=self.sample_sentences, format_version=shards.FORMAT_VERSION)


def _file_digest(path: str) -> str:
  if not os.path.isfile(path):
    raise UserError(f"Tokenizer model not found: '{path}'.")
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def describe_inputs(paths: list[str]) -> list[dict]:
  """Path, size and modification time of each input: a cheap identity for caching."""
  out = []
  for path in paths:
    stat = os.stat(path)
    out.append(dict(path=os.path.abspath(path), bytes=stat.st_size, mtime_ns=stat.st_mtime_ns))
  return out


def is_up_to_date(options: PrepareOptions) -> bool:
  """Whether `options.output` is complete, intact, and prepared from these inputs and recipe."""
  try:
    manifest = shards.read_manifest(options.output)
  except UserError:  # Unreadable or of another format version: not up to date.
    return False
  if manifest is None or shards.damaged_files(options.output, manifest):
    return False
  paths = text.resolve_inputs(options.inputs)
  return manifest["inputs"] == describe_inputs(paths) and manifest["recipe"] == options.recipe()


def prepare(options: PrepareOptions) -> dict:
  """Prepares `options.output` (or finds it already done); returns its manifest."""
  started = time.perf_counter()
  if options.eval_fraction < 0 or options.eval_fraction > 1:
    raise UserError(f"--eval_fraction is {options.eval_fraction}; it must be in [0, 1].")
  if options.num_workers < 0:
    raise UserError(f"--num_workers is {options.num_workers}; use 0 (this process) or more.")
  paths = text.resolve_inputs(options.inputs)
  inputs, recipe = describe_inputs(paths), options.recipe()
  out = options.output
  manifest_path = os.path.join(out, shards.MANIFEST)
  ours = os.path.isfile(manifest_path) or os.path.isfile(os.path.join(out, STATE))
  try:
    manifest = shards.read_manifest(out) if os.path.isdir(out) else None
  except UserError:
    if not options.overwrite:
      raise
    manifest = None  # Unreadable or of another version: replaced, as --overwrite asks.
  if manifest is not None:
    same = manifest["inputs"] == inputs and manifest["recipe"] == recipe
    damaged = shards.damaged_files(out, manifest)
    if same and not damaged:
      logging.info("'%s' is already prepared from these inputs.", out)
      return manifest
    if not same and not options.overwrite:
      raise UserError(f"'{out}' holds data prepared from other inputs or options. Choose "
                      "another --output, or pass --overwrite to replace it.")
    if damaged:
      logging.warning("'%s' is damaged (%s); preparing it again.", out, damaged[0])
  if os.path.isfile(manifest_path):
    os.remove(manifest_path)  # Incomplete from here until done again.
  state = _start_state(out, inputs, recipe, ours)

  tokenizer_path = os.path.join(out, shards.TOKENIZER)
  counts = collections.Counter()
  if options.tokenizer:
    tokenizer_lib.Tokenizer(options.tokenizer)  # Checks the special ids.
    if os.path.abspath(options.tokenizer) != os.path.abspath(tokenizer_path):
      shutil.copyfile(options.tokenizer, tokenizer_path)
  elif not state.get("tokenizer_done"):
    _train_tokenizer(paths, options, tokenizer_path, counts)
    state["tokenizer_done"] = True
    shards.write_json(os.path.join(out, STATE), state)
  tokenizer = tokenizer_lib.Tokenizer(tokenizer_path)

  tokenize_started = time.perf_counter()
  split_entries, work = _tokenize_all(paths, options, tokenizer, counts)
  work["tokenize_seconds"] = time.perf_counter() - tokenize_started
  seconds = time.perf_counter() - started
  encode_speed = _sentencepiece_speed(paths, options, tokenizer_path)
  stats = _stats(split_entries, work, counts, seconds, options, encode_speed)
  shards.write_json(os.path.join(out, shards.STATS), stats)
  fingerprint = hashlib.sha256(json.dumps(
      [_file_digest(tokenizer_path)] + [split_entries[s]["content_hash"] for s in shards.SPLITS]
  ).encode()).hexdigest()[:32]
  manifest = dict(format_version=shards.FORMAT_VERSION, fingerprint=fingerprint, inputs=inputs,
                  recipe=recipe, token_dtype=shards.token_dtype(tokenizer.vocab_size).name,
                  vocab_size=tokenizer.vocab_size, splits=split_entries)
  shards.write_json(os.path.join(out, shards.MANIFEST), manifest)
  os.remove(os.path.join(out, STATE))
  logging.info("Prepared '%s' in %.1f s: %s", out, seconds, json.dumps(
      {k: stats[k] for k in ("documents", "sentences", "tokens", "text_bytes")}))
  return manifest


def _start_state(out: str, inputs: list[dict], recipe: dict, ours: bool) -> dict:
  """The in-progress record of `out`; an earlier attempt's shards are removed, its tokenizer kept.

  A folder that is neither a prepared one nor one being prepared (`ours`) must be empty: files
  of the user's are never deleted or mixed with shards.
  """
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, STATE)
  state = None
  if os.path.isfile(path):
    try:
      with open(path, encoding="utf-8") as f:
        state = json.load(f)
    except ValueError:
      state = None
  if state is None or state.get("inputs") != inputs or state.get("recipe") != recipe:
    known = {shards.TOKENIZER, shards.STATS, STATE, shards.MANIFEST}
    foreign = [n for n in os.listdir(out) if n not in known and not _SHARD_FILE.match(n)
               and ".tmp-" not in n]
    if foreign and not ours:
      raise UserError(f"--output '{out}' is not empty and is not a jaxlm prepared folder "
                      f"(it holds '{foreign[0]}'). Choose a new or empty folder.")
    state = dict(inputs=inputs, recipe=recipe, tokenizer_done=False)
    shards.write_json(path, state)
  for name in os.listdir(out):
    if _SHARD_FILE.match(name) or ".tmp-" in name:
      os.remove(os.path.join(out, name))
  return state


def _documents(paths: list[str], options: PrepareOptions, counts) -> Iterator[list[str]]:
  for path in paths:
    yield from text.iter_documents(path, text_field=options.text_field, counts=counts)


def _train_tokenizer(paths, options: PrepareOptions, path: str, counts) -> None:
  """Trains on a uniform sample of sentences (reservoir sampling, Li's algorithm L)."""
  k = options.sample_sentences
  sample: list[str] = []
  rng = random.Random(0)
  w = math.exp(math.log(rng.random()) / k)
  skip = int(math.log(rng.random()) / math.log(1 - w)) if w < 1 else 0
  seen = 0
  scratch = collections.Counter()  # Repairs are counted in the tokenizing pass.
  logging.info("Sampling up to %d sentences to train a %d-piece %s tokenizer", k,
               options.vocab_size, options.model_type)
  for document in _documents(paths, options, scratch):
    for paragraph in document:
      for sentence in text.split_sentences(paragraph, max_chars=options.max_sentence_chars):
        seen += 1
        if len(sample) < k:
          sample.append(sentence)
        elif skip:
          skip -= 1
        else:
          sample[rng.randrange(k)] = sentence
          w *= math.exp(math.log(rng.random()) / k)
          skip = int(math.log(rng.random()) / math.log(1 - w)) if w < 1 else 0
  if not sample:
    raise UserError(f"The inputs '{options.inputs}' hold no text to train a tokenizer on.")
  counts["tokenizer_sample_sentences"] = len(sample)
  counts["tokenizer_sampled_from_sentences"] = seen
  tokenizer_lib.train(sample, path, vocab_size=options.vocab_size, model_type=options.model_type,
                      max_sentences=len(sample))


# Worker side: one sentencepiece processor per process.
_worker: dict = {}


def _init_worker(model_path: str, eval_fraction: float, max_sentence_chars: int) -> None:
  processor = spm.SentencePieceProcessor()
  processor.Load(model_path)
  _worker.update(sp=processor, eval_fraction=eval_fraction, max_chars=max_sentence_chars)


def _eval_document(paragraphs: list[str], eval_fraction: float) -> bool:
  """A stable choice from the document's own text: the same document always lands the same way."""
  digest = hashlib.blake2b("\n".join(paragraphs).encode("utf-8", "replace"), digest_size=8)
  return int.from_bytes(digest.digest(), "little") < eval_fraction * 2.0**64


def _tokenize_chunk(documents: list[list[str]]) -> dict:
  """Splits and encodes a chunk of documents; returns arrays per split and repair counts."""
  counts = collections.Counter()
  sentences: list[str] = []
  owners: list[int] = []
  for d, paragraphs in enumerate(documents):
    for paragraph in paragraphs:
      for sentence in text.split_sentences(paragraph, max_chars=_worker["max_chars"], counts=counts):
        sentences.append(sentence)
        owners.append(d)
  encoded = _worker["sp"].Encode(sentences, out_type=int)
  lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
  owners_a = np.asarray(owners, np.int64)
  is_eval = np.array([_eval_document(p, _worker["eval_fraction"]) for p in documents], bool)
  counts["empty_sentences_dropped"] += int((lengths == 0).sum())
  result = {"counts": counts, "text_bytes": sum(len(s.encode("utf-8", "replace")) for s in sentences)}
  for split, want in (("train", False), ("eval", True)):
    keep = (lengths > 0) & (is_eval[owners_a] == want) if len(owners_a) else np.zeros(0, bool)
    per_doc = np.bincount(owners_a[keep], minlength=len(documents))
    docs_in_split = np.flatnonzero(is_eval == want)
    empty_docs = int((per_doc[docs_in_split] == 0).sum())
    counts["documents_without_tokens_skipped"] += empty_docs
    flat = np.fromiter(itertools.chain.from_iterable(e for e, k in zip(encoded, keep) if k),
                       np.int32, int(lengths[keep].sum()))
    result[split] = (flat, lengths[keep], per_doc[docs_in_split][per_doc[docs_in_split] > 0])
  return result


def _chunks(documents: Iterator[list[str]]) -> Iterator[list[list[str]]]:
  chunk, size = [], 0
  for document in documents:
    chunk.append(document)
    size += sum(len(p) for p in document)
    if size >= _CHUNK_BYTES:
      yield chunk
      chunk, size = [], 0
  if chunk:
    yield chunk


def _tokenize_all(paths, options: PrepareOptions, tokenizer, counts):
  """Streams every document through the workers into the shard writers, in input order."""
  dtype = shards.token_dtype(tokenizer.vocab_size)
  writers = {s: shards.ShardWriter(options.output, s, dtype, options.shard_tokens)
             for s in shards.SPLITS}
  work = collections.Counter()
  init = (tokenizer.path, options.eval_fraction, options.max_sentence_chars)
  # Characters of text expected: gzip compresses prose about 3x (the bar is an estimate).
  total = sum(os.path.getsize(p) * (3 if p.endswith(".gz") else 1) for p in paths)
  progress = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=None,
                  file=sys.stderr)
  last_log = time.perf_counter()

  def absorb(result):
    nonlocal last_log
    counts.update(result["counts"])
    work["text_bytes"] += result["text_bytes"]
    for split in shards.SPLITS:
      tokens, lengths, per_doc = result[split]
      writers[split].add(tokens, lengths, per_doc)
    if time.perf_counter() - last_log > 30 and progress.disable:
      logging.info("prepare: %.1f MB of text tokenized", work["text_bytes"] / 1e6)
      last_log = time.perf_counter()

  documents = _documents(paths, options, counts)
  chunks = _chunks(_progress(documents, progress))
  if options.num_workers == 0:
    _init_worker(*init)
    for chunk in chunks:
      absorb(_tokenize_chunk(chunk))
  else:
    context = multiprocessing.get_context("spawn")  # Never fork a process that may run JAX.
    with context.Pool(options.num_workers, _init_worker, init) as pool:
      pending = collections.deque()
      for chunk in chunks:
        pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
        if len(pending) >= 2 * options.num_workers + 1:
          absorb(pending.popleft().get())
      while pending:
        absorb(pending.popleft().get())
  progress.close()
  entries = {split: writer.finish() for split, writer in writers.items()}
  if not entries["train"]["tokens"] and not entries["eval"]["tokens"]:
    raise UserError(f"The inputs '{options.inputs}' hold no text: nothing to prepare.")
  return entries, work


def _progress(documents, progress) -> Iterator[list[str]]:
  """Advances the bar by each document's characters."""
  for document in documents:
    progress.update(sum(len(p) + 1 for p in document))
    yield document


def _sentencepiece_speed(paths, options: PrepareOptions, model_path: str) -> float:
  """sentencepiece's own encoding speed (MB/s, one thread) on the first ~4 MB: the ceiling."""
  scratch = collections.Counter()
  sentences, size = [], 0
  for document in _documents(paths, options, scratch):
    for paragraph in document:
      for sentence in text.split_sentences(paragraph, max_chars=options.max_sentence_chars):
        sentences.append(sentence)
        size += len(sentence.encode("utf-8", "replace"))
    if size > 4 << 20:
      break
  processor = spm.SentencePieceProcessor()
  processor.Load(model_path)
  started = time.perf_counter()
  processor.Encode(sentences, out_type=int, num_threads=1)
  return size / 1e6 / max(time.perf_counter() - started, 1e-9)


def _stats(entries, work, counts, seconds, options, encode_speed) -> dict:
  workers = max(1, options.num_workers)
  mb_per_s = work["text_bytes"] / 1e6 / max(work["tokenize_seconds"], 1e-9)
  repairs = {k: v for k, v in sorted(counts.items())
             if k not in ("documents", "lines_read") and not k.startswith("tokenizer_")}
  return dict(
      documents=sum(e["documents"] for e in entries.values()),
      sentences=sum(e["sentences"] for e in entries.values()),
      tokens=sum(e["tokens"] for e in entries.values()),
      text_bytes=work["text_bytes"],
      input_bytes=sum(os.path.getsize(p) for p in text.resolve_inputs(options.inputs)),
      lines_read=counts.get("lines_read", 0),
      splits={s: {k: e[k] for k in ("documents", "sentences", "tokens")} for s, e in entries.items()},
      seconds=round(seconds, 2),
      tokenize_seconds=round(work["tokenize_seconds"], 2),
      workers=options.num_workers,
      text_mb_per_s=round(mb_per_s, 2),
      text_mb_per_s_per_worker=round(mb_per_s / workers, 2),
      sentencepiece_mb_per_s_one_thread=round(encode_speed, 2),
      per_worker_over_sentencepiece=round(mb_per_s / workers / max(encode_speed, 1e-9), 3),
      tokenizer={k[len("tokenizer_"):]: v for k, v in counts.items() if k.startswith("tokenizer_")},
      repaired_or_skipped=repairs,
  )
