"""From `config.data` to prepared train and eval data, and the run's tokenizer.

`data.train_files` is a prepared folder (`python -m jaxlm.prepare`) or text globs, which are
prepared on first use into `<workdir>/prepared/train` and reused while the files are unchanged;
"" is the embedded corpus. The eval text is the prepared data's eval split, or `data.eval_files`
(a prepared folder, whose eval split is used, or text globs, prepared with the training
tokenizer). Only process 0 prepares; the others open what it wrote.
"""

import dataclasses
import hashlib
import importlib.resources
import os
import shutil
from collections.abc import Callable

import ml_collections
from absl import logging

from jaxlm.data import prepare as prepare_lib, shards, tokenizer as tokenizer_lib
from jaxlm.errors import UserError

TOKENIZER_FILE = "tokenizer.model"
DATASET_FILE = "dataset.json"
_IN_PROCESS_BYTES = 16 << 20  # Smaller inputs are tokenized without starting worker processes.


def default_corpus_path() -> str:
  """The embedded corpus: The Jargon File, version 4.4.7 (public domain)."""
  return str(importlib.resources.files("jaxlm") / "assets" / "jargon.txt.gz")


@dataclasses.dataclass
class DataSources:
  train: shards.Split
  eval: shards.Split
  tokenizer: tokenizer_lib.Tokenizer
  fingerprint: str  # Of the training data and the eval data together.
  description: dict  # What `<workdir>/dataset.json` records.


def _as_prepared_folder(spec: str) -> str | None:
  """The folder when `spec` names one prepared folder (or any folder), else None (text globs)."""
  spec = os.path.expanduser(spec.strip())
  if "," not in spec and os.path.isdir(spec):
    return spec
  return None


def _prepare_text(spec: str, output: str, d: ml_collections.ConfigDict, vocab_size: int,
                  tokenizer: str, eval_fraction: float) -> None:
  from jaxlm.data import text

  paths = text.resolve_inputs(spec)
  total = sum(os.path.getsize(p) for p in paths)
  options = prepare_lib.PrepareOptions(
      inputs=spec, output=output, vocab_size=vocab_size, tokenizer=tokenizer,
      model_type=d.tokenizer_type, eval_fraction=eval_fraction,
      num_workers=0 if total < _IN_PROCESS_BYTES else (os.cpu_count() or 1), overwrite=True)
  if prepare_lib.is_up_to_date(options):
    return
  logging.info("Preparing %s into %s (once: later runs reuse it while the files are unchanged; "
               "for a large corpus run `python -m jaxlm.prepare` and set data.train_files to "
               "its folder)", spec, output)
  prepare_lib.prepare(options)


def _prepare_all(d: ml_collections.ConfigDict, model_vocab_size: int, workdir: str) -> None:
  """Process 0's part: text inputs prepared into the workdir, the tokenizer copied there."""
  os.makedirs(workdir, exist_ok=True)
  train_spec = d.train_files.strip() or default_corpus_path()
  if _as_prepared_folder(train_spec) is None:
    _prepare_text(train_spec, os.path.join(workdir, "prepared", "train"), d,
                  d.tokenizer_vocab_size or model_vocab_size, d.tokenizer,
                  0.0 if d.eval_files.strip() else d.eval_fraction)
  train_dir = _train_dir(d, workdir)
  if d.eval_files.strip() and _as_prepared_folder(d.eval_files) is None:
    _prepare_text(d.eval_files, os.path.join(workdir, "prepared", "eval"), d, model_vocab_size,
                  os.path.join(train_dir, shards.TOKENIZER), 1.0)
  kept, source = os.path.join(workdir, TOKENIZER_FILE), os.path.join(train_dir, shards.TOKENIZER)
  if not os.path.isfile(source):
    return  # Not a prepared folder: opening it says so.
  if not os.path.isfile(kept) or _digest(kept) != _digest(source):
    shutil.copyfile(source, kept + ".tmp")
    os.replace(kept + ".tmp", kept)


def _train_dir(d, workdir: str) -> str:
  spec = d.train_files.strip()
  return _as_prepared_folder(spec) if spec and _as_prepared_folder(spec) else os.path.join(
      workdir, "prepared", "train")


def _digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def resolve(
    d: ml_collections.ConfigDict,
    model_vocab_size: int,
    workdir: str,
    *,
    is_main: bool = True,
    share_failure: Callable[[bool], bool] = lambda failed: failed,
) -> DataSources:
  """Prepares (process 0) and opens the run's data; checks the tokenizer against the model.

  `share_failure(failed)` tells every process whether process 0 failed (a collective on several
  hosts), so no process waits for files that will never come.
  """
  failure = None
  if is_main:
    try:
      _prepare_all(d, model_vocab_size, workdir)
    except Exception as e:  # Any failure is shared first, so no process waits for ever.
      failure = e
  if share_failure(failure is not None) and not is_main:
    raise UserError("Process 0 could not prepare the data; its log says why.")
  if failure is not None:
    raise failure

  train_data = shards.PreparedData(_train_dir(d, workdir))
  tokenizer = tokenizer_lib.Tokenizer(train_data.tokenizer_path)
  if tokenizer.vocab_size > model_vocab_size:
    raise UserError(
        f"The tokenizer '{tokenizer.path}' has {tokenizer.vocab_size} pieces but the model's "
        f"embedding has model.vocab_size={model_vocab_size} rows; ids past the table would turn "
        f"embeddings into NaN. Set --config.model.vocab_size={tokenizer.vocab_size} (or more), "
        "or prepare the data with a smaller tokenizer.")
  eval_data = train_data
  if d.eval_files.strip():
    eval_dir = _as_prepared_folder(d.eval_files) or os.path.join(workdir, "prepared", "eval")
    eval_data = shards.PreparedData(eval_dir)
    if _digest(eval_data.tokenizer_path) != _digest(train_data.tokenizer_path):
      raise UserError(
          f"The eval data '{eval_dir}' was prepared with another tokenizer than the training "
          f"data '{train_data.directory}': their ids mean different pieces. Prepare the eval "
          f"text with `--tokenizer={train_data.tokenizer_path}`, or give it as text files.")
  fingerprint = train_data.fingerprint if eval_data is train_data else hashlib.sha256(
      f"{train_data.fingerprint}:{eval_data.fingerprint}".encode()).hexdigest()[:32]
  description = dict(
      fingerprint=fingerprint,
      train=dict(folder=os.path.abspath(train_data.directory), fingerprint=train_data.fingerprint,
                 **{k: v for k, v in train_data.manifest["splits"]["train"].items()
                    if k != "shards"}),
      eval=dict(folder=os.path.abspath(eval_data.directory), fingerprint=eval_data.fingerprint,
                **{k: v for k, v in eval_data.manifest["splits"]["eval"].items()
                   if k != "shards"}),
      tokenizer_pieces=tokenizer.vocab_size)
  return DataSources(train=train_data.splits["train"], eval=eval_data.splits["eval"],
                     tokenizer=tokenizer, fingerprint=fingerprint, description=description)


def check_fingerprint(saved: str | None, current: str, allow_change: bool) -> None:
  """A workdir resumes on the data it started with, unless `data.allow_data_change` says so."""
  if saved is None or saved == current:
    return
  if allow_change:
    logging.warning("Resuming on other data (fingerprint %s, the checkpoint was trained on %s), "
                    "as data.allow_data_change asks.", current, saved)
    return
  raise UserError(
      f"This workdir's checkpoints were trained on other data (fingerprint {saved}; the "
      f"configured data is {current}). Use a new --workdir, restore the original data, or set "
      "--config.data.allow_data_change=True to continue on the new data on purpose.")
