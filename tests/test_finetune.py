"""Fine-tuning: a classifier on a pretrained run's encoder, in full and with LoRA, through the
shared trainer; the source run is a freshly initialised one (no pretraining needed)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import experiment_config, make_run_folder
from jaxlm.errors import UserError
from jaxlm.training import finetuning, pretrained
from jaxlm.training.metrics import read_metrics as _read_metrics

# 40 steps at 1e-2 take the random encoder's eval loss to <= 0.03 with each of init seeds 0-4
# here; 30 steps at 3e-3 left it near 0.65, a coin toss on another CPU's rounding (CI saw 0.5).
STEPS = 40
LEARNING_RATE = "1e-2"


def read_metrics(workdir):
  return {r["step"]: r for r in _read_metrics(os.path.join(workdir, "metrics.jsonl"))}


def _pretraining_config():
  config = experiment_config("bert_tiny")
  config.model.update(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                      max_position=32)
  config.data.seq_len = 32
  return config


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
  return make_run_folder(tmp_path_factory.mktemp("source") / "run", _pretraining_config(),
                         tokenizer.path, step=5)


def _write_task(folder, rows_train=160, rows_eval=48):
  """Separable two-class data: the first word tells the class, the rest is noise."""
  rng = np.random.default_rng(0)
  words = "the of and hacker program kernel file user system bug".split()
  paths = {}
  for split, rows in (("train", rows_train), ("eval", rows_eval)):
    paths[split] = os.path.join(folder, f"{split}.jsonl")
    with open(paths[split], "w", encoding="utf-8") as f:
      for k in range(rows):
        label = ("good", "bad")[k % 2]
        lead = "wonderful" if label == "good" else "terrible"
        body = " ".join(rng.choice(words, size=6))
        f.write(json.dumps({"text": f"{lead} {body}", "label": label}) + "\n")
  return paths


def _config(source_dir, paths, **lora):
  config = experiment_config("finetune_classify")
  config.init_from = source_dir
  config.data.update(train_file=paths["train"], eval_file=paths["eval"], seq_len=32,
                     batch_size=16)
  config.train.update(steps=STEPS, eval_every=STEPS, log_every=10, checkpoint_every=STEPS)
  config.optimizer.update(learning_rate=float(LEARNING_RATE), warmup_steps=3)
  config.lora.update(**lora)
  return config


@pytest.fixture(scope="module")
def task_paths(tmp_path_factory):
  return _write_task(str(tmp_path_factory.mktemp("task")))


@pytest.fixture(scope="module")
def full(tmp_path_factory, source, task_paths):
  workdir = str(tmp_path_factory.mktemp("full") / "run")
  return workdir, finetuning.finetune(_config(source, task_paths), workdir)


@pytest.fixture(scope="module")
def with_lora(repo_root, tmp_path_factory, source, task_paths):
  """Run as its user runs it: the command line."""
  workdir = str(tmp_path_factory.mktemp("lora") / "run")
  result = subprocess.run(
      [sys.executable, "-m", "jaxlm.finetune", "--config=experiments/finetune_classify.py",
       f"--workdir={workdir}", f"--config.init_from={source}",
       f"--config.data.train_file={task_paths['train']}",
       f"--config.data.eval_file={task_paths['eval']}", "--config.data.seq_len=32",
       "--config.data.batch_size=16", f"--config.train.steps={STEPS}",
       f"--config.train.eval_every={STEPS}", f"--config.train.checkpoint_every={STEPS}",
       f"--config.optimizer.learning_rate={LEARNING_RATE}", "--config.optimizer.warmup_steps=3",
       "--config.lora.rank=2", "--config.lora.alpha=4", "--config.lora.targets=query,value"],
      cwd=repo_root, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, read_metrics(workdir)[STEPS]


def test_full_finetuning_learns_and_logs_accuracy_and_f1(full):
  workdir, last = full
  assert last["eval/accuracy"] >= 0.9, last
  assert last["eval/loss"] < 0.3, last
  assert 0.9 <= last["eval/f1"] <= 1.0
  rows = read_metrics(workdir)
  assert rows[STEPS]["eval/accuracy"] == last["eval/accuracy"]
  assert rows[1]["classify_loss"] > rows[STEPS]["classify_loss"]
  with open(os.path.join(workdir, finetuning.LABELS_FILE), encoding="utf-8") as f:
    assert json.load(f)["labels"] == ["bad", "good"]
  assert os.path.isfile(os.path.join(workdir, "tokenizer.model"))
  saved = pretrained.read_config(workdir)
  assert saved.model.hidden_size == 32 and saved.init_from


def test_finetuning_starts_from_the_pretrained_encoder(source, task_paths, tmp_path):
  config = _config(source, task_paths)
  task = finetuning.finetuning_task(config, str(tmp_path))
  run = pretrained.load(source)
  fresh = jax.tree_util.tree_map(np.zeros_like, run.params)
  fresh = {"encoder": jax.device_put(fresh["encoder"]), "classify": {}}
  started = task.initial_params(fresh)
  for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(started["encoder"])[0],
                               jax.tree_util.tree_leaves(run.params["encoder"])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))


def _saved_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  return manager.item_metadata(manager.latest_step())["state"]["params"]


def test_lora_trains_adapters_and_head_only(full, with_lora):
  workdir, last = with_lora
  assert 0 <= last["eval/accuracy"] <= 1 and 0 <= last["eval/f1"] <= 1
  saved = _saved_params(workdir)
  assert set(saved) == {"adapters", "classify"}  # No frozen weight in the checkpoint.
  trained = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(saved))
  model = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(_saved_params(full[0])))
  assert trained / model < 0.05, (trained, model)
  adapted = set(saved["adapters"]["encoder"]["layer_0"]["attention"])
  assert adapted == {"query", "value"}
  # The adapters trained (B starts at zero); the accuracy against full fine-tuning is measured
  # on a pretrained encoder (README), not on this random one.
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  restored = manager.restore(STEPS, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
  b = restored.state["params"]["adapters"]["encoder"]["layer_0"]["attention"]["query"]["b"]
  assert np.abs(np.asarray(b)).max() > 1e-4


def test_bad_configs_are_plain_errors(source, task_paths, tmp_path):
  config = _config(source, task_paths)
  config.init_from = ""
  with pytest.raises(UserError, match="init_from"):
    finetuning.finetune(config, str(tmp_path / "a"))
  config = _config(source, task_paths)
  config.data.eval_file = str(tmp_path / "missing.jsonl")
  with pytest.raises(UserError, match="missing.jsonl"):
    finetuning.finetune(config, str(tmp_path / "b"))
  with open(tmp_path / "other.jsonl", "w", encoding="utf-8") as f:
    f.write(json.dumps({"text": "wonderful", "label": "good"}) + "\n")
    f.write(json.dumps({"text": "so so", "label": "neutral"}) + "\n")
  config = _config(source, task_paths)
  config.data.eval_file = str(tmp_path / "other.jsonl")
  with pytest.raises(UserError, match=r"other\.jsonl.*2.*neutral"):
    finetuning.finetune(config, str(tmp_path / "c"))


def test_init_from_hf_starts_pretraining_and_finetuning_from_an_export(source, task_paths,
                                                                       tmp_path):
  """A jaxlm export read back by `--config.init_from_hf`: the same encoder for fine-tuning, and
  the same encoder and heads for pretraining (with the folder's sizes and tokenizer)."""
  pytest.importorskip("transformers")  # The `hf` extra; CI installs it.
  from jaxlm import export
  from jaxlm.models import ModelConfig, Pretrainer
  from jaxlm.training import loop, state as state_lib

  folder = str(tmp_path / "hf")
  export.export_run(source, folder)
  run = pretrained.load(source)
  want = dict(jax.tree_util.tree_flatten_with_path(run.params)[0])

  config = _config(source, task_paths)
  config.init_from, config.init_from_hf = "", folder
  task = finetuning.finetuning_task(config, str(tmp_path))
  started = task.initial_params({"encoder": run.params["encoder"], "classify": {}})
  for path, got in jax.tree_util.tree_flatten_with_path(started["encoder"])[0]:
    full_path = (jax.tree_util.DictKey("encoder"),) + path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want[full_path]), str(path))

  config = _pretraining_config()
  config.model.hidden_size = 64  # Replaced by the folder's.
  config.init_from_hf = folder
  hook = loop._from_hf(config)
  assert config.model.hidden_size == 32
  assert config.data.tokenizer.endswith("tokenizer.model")
  model = Pretrainer.for_objectives(ModelConfig.from_config(config.model), run.objectives)
  batch = pretrained.model_inputs(run.objectives, config.data.seq_len)
  abstract = state_lib.abstract_params(model, batch, run.mesh, run.rules)
  with jax.set_mesh(run.mesh):
    fresh = state_lib.init_params(jax.random.key(7), model, batch, abstract)
    started = hook(fresh)
  for path, got in jax.tree_util.tree_flatten_with_path(started)[0]:
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want[path]), str(path))
