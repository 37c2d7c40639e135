"""From `config.data` to tokenized train and eval documents and the run's tokenizer."""

import os
import shutil

import ml_collections
from absl import logging

from jaxlm.data import corpus, tokenizer as tokenizer_lib
from jaxlm.data.examples import TokenDocument
from jaxlm.data.loader import tokenize_documents
from jaxlm.errors import UserError

TOKENIZER_FILE = "tokenizer.model"


def load_corpora(config: ml_collections.ConfigDict, seed: int) -> tuple[list, list]:
  """Train and eval documents (text). Eval is `eval_files`, else held-out train documents."""
  train_paths = corpus.resolve_files(config.train_files) if config.train_files.strip() else [
      corpus.default_corpus_path()]
  if not train_paths:
    raise UserError(f"data.train_files '{config.train_files}' names no regular file.")
  documents = corpus.read_documents(train_paths)
  if config.eval_files.strip():
    return documents, corpus.read_documents(corpus.resolve_files(config.eval_files))
  return corpus.split_train_eval(documents, config.eval_fraction, seed)


def run_tokenizer(
    config: ml_collections.ConfigDict,
    model_vocab_size: int,
    workdir: str,
    train_documents: list,
    *,
    may_write: bool = True,
) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, kept as `<workdir>/tokenizer.model`.

  A configured `data.tokenizer` is copied into the workdir; otherwise the workdir's copy from an
  earlier run is reused, or a new one is trained on the training documents. Only the process
  with `may_write` writes; the others call this again after it has.
  """
  kept = os.path.join(workdir, TOKENIZER_FILE)
  if config.tokenizer:
    tokenizer = tokenizer_lib.Tokenizer(config.tokenizer)
    if may_write and os.path.abspath(config.tokenizer) != os.path.abspath(kept):
      shutil.copyfile(config.tokenizer, kept)
  elif os.path.exists(kept) or not may_write:
    tokenizer = tokenizer_lib.Tokenizer(kept)
  else:
    vocab = config.tokenizer_vocab_size or model_vocab_size
    logging.info("Training a %s tokenizer of %d pieces into %s", config.tokenizer_type, vocab, kept)
    lines = (s for d in train_documents for p in d for s in corpus.split_sentences(p))
    tokenizer = tokenizer_lib.train(lines, kept, vocab_size=vocab, model_type=config.tokenizer_type)
  if tokenizer.vocab_size > model_vocab_size:
    raise UserError(
        f"The tokenizer '{tokenizer.path}' has {tokenizer.vocab_size} pieces but the model's "
        f"embedding has model.vocab_size={model_vocab_size} rows; ids past the table would turn "
        f"embeddings into NaN. Set --config.model.vocab_size={tokenizer.vocab_size} (or more), "
        "or use a smaller tokenizer."
    )
  return tokenizer


def tokenize(documents: list, tokenizer: tokenizer_lib.Tokenizer) -> list[TokenDocument]:
  return tokenize_documents(documents, tokenizer.encode_batch, corpus.split_sentences)
