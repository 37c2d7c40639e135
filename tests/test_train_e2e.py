"""End to end: a short BERT-tiny run on the embedded corpus, its resumption, and the CLI."""

import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys

import jax
import pytest

import jaxlm
from jaxlm.errors import UserError
from jaxlm.training import loop
from jaxlm.training.metrics import read_metrics

TRAIN_KEYS = ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "learning_rate",
              "grad_norm", "tokens_per_sec", "mfu")
EVAL_KEYS = ("eval/loss", "eval/mlm_loss", "eval/mlm_accuracy", "eval/nsp_loss",
             "eval/nsp_accuracy")


def _tiny_config(repo_root, steps):
  """experiments/bert_tiny.py, cut down to run in seconds."""
  spec = importlib.util.spec_from_file_location(
      "bert_tiny", os.path.join(repo_root, "experiments", "bert_tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.steps = steps
  config.train.log_every = 10
  config.train.eval_every = 20
  config.data.eval_examples = 32
  config.train.checkpoint_every = 20
  config.data.batch_size = 16
  config.data.seq_len = 64
  config.model.max_position = 64
  config.model.vocab_size = 512  # The tokenizer trained into the workdir has as many pieces.
  return config


@dataclasses.dataclass
class Run:
  workdir: str
  rows: list  # metrics.jsonl lines, in file order.
  last: dict  # What train_and_evaluate returned.
  tokenizer: bytes
  tokenizer_stat: os.stat_result


def _run(repo_root, workdir, steps):
  last = loop.train_and_evaluate(_tiny_config(repo_root, steps), workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  path = os.path.join(workdir, "tokenizer.model")
  with open(path, "rb") as f:
    return Run(workdir, rows, last, f.read(), os.stat(path))


@pytest.fixture(scope="module")
def first(repo_root, tmp_path_factory):
  return _run(repo_root, str(tmp_path_factory.mktemp("tiny") / "run"), steps=40)


@pytest.fixture(scope="module")
def resumed(repo_root, first):
  return _run(repo_root, first.workdir, steps=60)


def _train_rows(rows):
  return [r for r in rows if "loss" in r]


def _eval_rows(rows):
  return [r for r in rows if "eval/loss" in r]


def test_run_writes_its_files(first):
  for name in ("config.json", "tokenizer.model", "metrics.jsonl"):
    assert os.path.isfile(os.path.join(first.workdir, name)), name
  with open(os.path.join(first.workdir, "config.json"), encoding="utf-8") as f:
    written = json.load(f)
  assert written["train"]["steps"] == 40 and written["data"]["seq_len"] == 64
  assert os.listdir(os.path.join(first.workdir, "tensorboard"))
  steps = sorted(int(s) for s in os.listdir(os.path.join(first.workdir, "checkpoints"))
                 if s.isdigit())
  assert steps == [20, 40]


def test_metrics_rows(first):
  train, evaluation = _train_rows(first.rows), _eval_rows(first.rows)
  assert [r["step"] for r in train] == [1, 10, 20, 30, 40]
  assert [r["step"] for r in evaluation] == [20, 40]
  assert len(train) + len(evaluation) == len(first.rows)
  for row in train:
    for key in TRAIN_KEYS:
      assert isinstance(row[key], float), (row["step"], key, row.get(key))
    assert 0 <= row["mlm_accuracy"] <= 1 and 0 <= row["nsp_accuracy"] <= 1
    assert row["tokens_per_sec"] > 0 and row["mfu"] > 0 and row["skipped_steps"] == 0
    # The total loss is the weighted sum of the objectives' (both weigh 1 here): exactly so
    # for one step; over several, the per-step mean and the per-token mean differ a little.
    tolerance = 1e-5 if row["step"] == 1 else 2e-2
    assert row["loss"] == pytest.approx(row["mlm_loss"] + row["nsp_loss"], rel=tolerance)
  for row in evaluation:
    for key in EVAL_KEYS:
      assert isinstance(row[key], float), (row["step"], key)
    assert row["eval/mlm_perplexity"] == pytest.approx(math.exp(row["eval/mlm_loss"]))
    assert "eval/nsp_perplexity" not in row
    assert not set(TRAIN_KEYS) & set(row)
  assert train[0]["learning_rate"] == 0.0  # Step 0 of the warm-up.
  assert max(r["learning_rate"] for r in train) > 0
  assert first.last["eval/loss"] == evaluation[-1]["eval/loss"]


def test_the_model_learns(first):
  train = _train_rows(first.rows)
  assert train[-1]["mlm_loss"] < train[0]["mlm_loss"] - 0.3, [r["mlm_loss"] for r in train]
  evaluation = _eval_rows(first.rows)
  assert evaluation[-1]["eval/mlm_loss"] < train[0]["mlm_loss"]


def test_resume_continues_where_it_stopped(first, resumed):
  before = [r for r in resumed.rows if r["step"] <= 40]
  assert before == first.rows  # The first run's rows are kept as they were.
  new = resumed.rows[len(before):]
  assert new and new[0]["step"] > 40
  train = _train_rows(resumed.rows)
  steps = [r["step"] for r in train]
  assert steps == sorted(set(steps)) and steps[-1] == 60
  assert [r["step"] for r in _train_rows(new)] == [50, 60]
  assert [r["step"] for r in _eval_rows(new)] == [60]
  assert os.path.isdir(os.path.join(resumed.workdir, "checkpoints", "60"))
  # Training went on from the trained weights, not from scratch.
  assert _train_rows(new)[0]["mlm_loss"] < _train_rows(first.rows)[0]["mlm_loss"] - 0.3
  with open(os.path.join(resumed.workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["train"]["steps"] == 60


def test_resume_reuses_the_tokenizer(first, resumed):
  assert resumed.tokenizer == first.tokenizer
  # The very same file, not one trained again into its place.
  assert resumed.tokenizer_stat.st_ino == first.tokenizer_stat.st_ino
  assert resumed.tokenizer_stat.st_mtime_ns == first.tokenizer_stat.st_mtime_ns


def _run_records(workdir):
  with open(os.path.join(workdir, "runs.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_each_start_appends_its_record(first, resumed):
  records = _run_records(resumed.workdir)
  assert [r["start_step"] for r in records] == [0, 40]
  assert [r["config"]["train"]["steps"] for r in records] == [40, 60]
  assert records[0]["data_fingerprint"] == records[1]["data_fingerprint"]
  assert len(records[0]["data_fingerprint"]) >= 16
  for record in records:
    assert record["packages"]["jax"] == jax.__version__
    assert record["devices"]["count"] == jax.device_count()
    assert record["jaxlm_version"] == jaxlm.__version__
    assert record["git"] == {} or len(record["git"]["commit"]) == 40


def test_workdir_records_its_data_and_refuses_other_data(repo_root, resumed, prepared_corpus):
  with open(os.path.join(resumed.workdir, "dataset.json"), encoding="utf-8") as f:
    dataset = json.load(f)
  assert dataset["train"]["tokens"] > 0 and dataset["eval"]["documents"] > 0
  config = _tiny_config(repo_root, steps=70)
  config.data.train_files = prepared_corpus.directory  # Other data (another tokenizer).
  with open(os.path.join(resumed.workdir, "config.json"), encoding="utf-8") as f:
    saved = f.read()
  with pytest.raises(UserError, match="trained on other data.*allow_data_change"):
    loop.train_and_evaluate(config, resumed.workdir)
  assert not os.path.isdir(os.path.join(resumed.workdir, "checkpoints", "70"))
  assert len(_run_records(resumed.workdir)) == 2  # A refused start leaves no record.
  with open(os.path.join(resumed.workdir, "config.json"), encoding="utf-8") as f:
    assert f.read() == saved  # Nor a config that evaluate / export would read the run with.


def test_read_metrics_merges_rows_per_step(resumed):
  rows = read_metrics(os.path.join(resumed.workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 10, 20, 30, 40, 50, 60]
  assert "eval/loss" in rows[-1] and "loss" in rows[-1]


def test_tokenizer_larger_than_the_model_vocabulary(repo_root, tokenizer, tmp_path):
  config = _tiny_config(repo_root, steps=5)
  config.data.tokenizer = tokenizer.path
  config.model.vocab_size = 256
  with pytest.raises(UserError) as raised:
    loop.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(raised.value)
  assert f"{tokenizer.vocab_size} pieces" in message and "model.vocab_size=256" in message
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _cli(repo_root, workdir, *overrides):
  return subprocess.run(
      [sys.executable, "-m", "jaxlm.train", "--config=experiments/bert_tiny.py",
       f"--workdir={workdir}", *overrides],
      cwd=repo_root, capture_output=True, text=True, timeout=120, check=False,
  )


def test_cli_unknown_config_key(repo_root, tmp_path):
  result = _cli(repo_root, tmp_path / "run", "--config.train.stepz=5")
  assert result.returncode != 0
  assert "stepz" in result.stderr
  assert "train.steps" in result.stderr  # The suggestion.
  assert "Traceback" not in result.stderr + result.stdout
  assert not (tmp_path / "run").exists()


def test_cli_missing_data_file(repo_root, tmp_path):
  result = _cli(repo_root, tmp_path / "run", "--config.data.train_files=/nonexistent/x.txt",
                "--config.train.steps=5")
  assert result.returncode != 0
  assert "/nonexistent/x.txt" in result.stderr
  assert "Traceback" not in result.stderr + result.stdout


def test_evaluate_restores_parameters_and_matches_training(first, resumed, tmp_path):
  """`evaluate` on a saved step reports exactly what training's eval of that step did."""
  from jaxlm.training import evaluation

  workdir = str(tmp_path / "run")
  shutil.copytree(resumed.workdir, workdir)
  trained = {r["step"]: r for r in _eval_rows(resumed.rows)}
  for step in (40, 60):
    row = evaluation.evaluate_run(workdir, step=step, write=step == 60)
    assert row["step"] == step
    for key in EVAL_KEYS + ("eval/mlm_perplexity",):
      assert row[key] == pytest.approx(trained[step][key], rel=1e-5, abs=1e-6), (step, key)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[: len(resumed.rows)] == resumed.rows  # Appended, nothing rewritten.
  assert rows[-1]["step"] == 60 and "eval/mlm_accuracy" in rows[-1]
  assert len(rows) == len(resumed.rows) + 1
  with pytest.raises(UserError, match=r"No checkpoint of step 7 .*\[20, 40, 60\]"):
    evaluation.evaluate_run(workdir, step=7)


def test_evaluate_cli_overrides_the_saved_config(repo_root, resumed, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(resumed.workdir, workdir)
  result = subprocess.run(
      [sys.executable, "-m", "jaxlm.evaluate", f"--workdir={workdir}", "--step=40",
       "--config.data.eval_examples=16", "--write=false"],
      cwd=repo_root, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "step 40: eval/loss" in result.stdout
  assert re.search(r"^mlm\s+\d\.\d{4}\s+0\.\d{4}\s+\d+\.\d\d$", result.stdout, re.M)
  assert "eval windows 16, pairs 16" in result.stderr  # The override took effect.
  bad = subprocess.run(
      [sys.executable, "-m", "jaxlm.evaluate", f"--workdir={workdir}", "--config.data.evl=3"],
      cwd=repo_root, capture_output=True, text=True, timeout=60, check=False)
  assert bad.returncode != 0 and "data.evl" in bad.stderr and "Traceback" not in bad.stderr
