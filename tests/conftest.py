"""Shared fixtures: the embedded corpus, a small tokenizer trained on it, and its prepared folder.

The mesh tests need 8 devices. Simulated CPU devices must be requested before JAX starts, so
this file asks for them when XLA_FLAGS does not already say how many (pytest imports it before
any test module imports jax).
"""

import os

_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_DEVICES_FLAG}=8").strip()

# One persistent XLA compilation cache for the run, shared by both xdist workers and every
# subprocess the tests start (CLI runs, runs killed and resumed): a program compiles once. The
# cache is keyed by the program, the flags and the jax version, so a hit is the same executable.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jaxlm-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

import collections  # noqa: E402

from jaxlm.data import prepare, setup, shards, text, tokenizer as tokenizer_lib  # noqa: E402

TOKENIZER_VOCAB = 512


@pytest.fixture(scope="session")
def repo_root():
  """The checkout holding jaxlm/, configs/ and experiments/."""
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def corpus_documents():
  """The embedded corpus as text documents (lists of paragraphs)."""
  return list(text.iter_documents(setup.default_corpus_path(), counts=collections.Counter()))


def experiment_config(name: str):
  """`get_config()` of experiments/<name>.py, loaded by path as the CLI does."""
  import importlib.util

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(name, os.path.join(root, "experiments", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def words_of(row, word_start_V):
  """Words of a row as lists of positions: a piece that starts a word (by `word_start_V`, or a
  regular piece after a special token or at the row's start) and the continuation pieces after
  it. Special tokens and padding belong to no word."""
  from jaxlm.data.tokenizer import NUM_SPECIAL

  words = []
  for i, token in enumerate(row):
    if token < NUM_SPECIAL:
      continue
    if word_start_V[token] or i == 0 or row[i - 1] < NUM_SPECIAL:
      words.append([i])
    else:
      words[-1].append(i)
  return words


def sentences_of(documents):
  return [s for d in documents for p in d for s in text.split_sentences(p)]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, corpus_documents):
  """A 512-piece jaxlm tokenizer; trained on a sample of sentences to stay near 2 s."""
  path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
  return tokenizer_lib.train(sentences_of(corpus_documents), str(path), vocab_size=TOKENIZER_VOCAB,
                             max_sentences=4000)


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory, tokenizer):
  """The embedded corpus prepared with that tokenizer (5% of documents held out)."""
  output = str(tmp_path_factory.mktemp("prepared") / "jargon")
  prepare.prepare(prepare.PrepareOptions(inputs=setup.default_corpus_path(), output=output,
                                         tokenizer=tokenizer.path, eval_fraction=0.05))
  return shards.PreparedData(output)


def make_run_folder(workdir, config, tokenizer_path, *, step=0, seed=0):
  """A run folder as training leaves it (`config.json`, `tokenizer.model`, `checkpoints/<step>`)
  holding freshly initialised parameters: for tests of what reads runs (predict, evaluate,
  export), with no training. Returns `workdir`."""
  import shutil

  import flax.linen as nn
  import jax

  from jaxlm.models import ModelConfig, Pretrainer
  from jaxlm.objectives import DataSpec, build_objectives
  from jaxlm.parallel import rules as rules_lib
  from jaxlm.training import checkpoints, optimizer, pretrained, state as state_lib

  workdir = str(workdir)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, pretrained.CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  shutil.copy(tokenizer_path, os.path.join(workdir, setup.TOKENIZER_FILE))
  tokenizer = tokenizer_lib.Tokenizer(tokenizer_path)
  spec = DataSpec(vocab_size=tokenizer.vocab_size, seq_len=config.data.seq_len,
                  word_start=tokenizer.word_start)
  objectives = build_objectives(config.objectives, spec, config.get("eval"))
  model = Pretrainer.for_objectives(ModelConfig.from_config(config.model), objectives)
  mesh, rules = pretrained.inference_mesh(config), rules_lib.rules_from_config(config.mesh)
  tx, _ = optimizer.make_optimizer(config.optimizer, config.train.steps)
  batch = pretrained.model_inputs(objectives, config.data.seq_len)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = state_lib.abstract_state(model, tx, batch, mesh, rules)
    state = state_lib.init_state(jax.random.key(seed), model, tx, batch, shardings)
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
    checkpointer.save(step, state, {})
    checkpointer.wait()
    checkpointer.close()
  return workdir


# The slowest files first (each takes one xdist worker whole, `--dist loadfile`), so that the two
# workers finish together instead of one running a long file alone at the end.
_SLOWEST_FIRST = ("test_parallel_e2e", "test_resilience", "test_seeds", "test_sweep",
                  "test_finetune", "test_notebook", "test_train_e2e", "test_modern", "test_mesh",
                  "test_plm", "test_predict", "test_clm", "test_recipes", "test_hf",
                  "test_prepare", "test_guards", "test_checkpoint", "test_scale_options")


def pytest_collection_modifyitems(items):
  def rank(item):
    module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    return _SLOWEST_FIRST.index(module) if module in _SLOWEST_FIRST else len(_SLOWEST_FIRST)

  items.sort(key=rank)  # Stable: the order within a file is kept.
