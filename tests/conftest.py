"""Shared fixtures: a small tokenizer trained on the embedded corpus, and its tokenized documents.

The mesh tests need 8 devices. Simulated CPU devices must be requested before JAX starts, so
this file asks for them when XLA_FLAGS does not already say how many (pytest imports it before
any test module imports jax).
"""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_DEVICES_FLAG}=8").strip()

import pytest  # noqa: E402

from jaxlm.data import corpus, setup, tokenizer as tokenizer_lib  # noqa: E402

TOKENIZER_VOCAB = 512


@pytest.fixture(scope="session")
def repo_root():
  """The checkout holding jaxlm/, configs/ and experiments/."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def corpus_documents():
  """The embedded corpus as text documents (lists of paragraphs)."""
  return corpus.read_documents([corpus.default_corpus_path()])


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, corpus_documents):
  """A 512-piece jaxlm tokenizer; trained on a sample of sentences to stay near 2 s."""
  lines = [s for d in corpus_documents for p in d for s in corpus.split_sentences(p)]
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
  return tokenizer_lib.train(lines, str(path), vocab_size=TOKENIZER_VOCAB, max_sentences=4000)


@pytest.fixture(scope="session")
def token_documents(corpus_documents, tokenizer):
  """The embedded corpus tokenized: documents of sentence segments (int32 arrays)."""
  return setup.tokenize(corpus_documents, tokenizer)
