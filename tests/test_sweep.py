"""`python -m jaxlm.sweep`: checking points, running them (failures, skipping what is finished,
seeds, stopping) and the summary, whose arithmetic is also tested on synthetic metrics rows."""

import csv
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time

import pytest

from jaxlm.analysis import summary
from jaxlm.training.metrics import read_metrics

# Three steps of batch 16, evaluated at the end: seconds per run once the step is compiled.
FAST = ("--config.train.steps=3", "--config.data.batch_size=16", "--config.data.eval_examples=16",
        "--config.train.eval_every=3", "--config.train.log_every=1",
        "--config.train.checkpoint_every=3")

# `a` and `b` compile to the same steps (the mask rate acts on the host), so the compilation
# cache serves `b` and the seeds. `no_eval_data` fails when its trainer starts.
EXPERIMENT = '''
from configs import recipes


def get_config():
  config = recipes.tiny_fast()
  config.data.format = "full_sentences"
  config.objectives.nsp.weight = 0.0
  return config


def get_sweep():
  return [
      {"name": "a", "overrides": {}},
      {"name": "no_eval_data", "overrides": {"data.eval_files": "/nonexistent/eval.txt"}},
      {"name": "b", "overrides": {"objectives.mlm.mask_rate": 0.3}},
  ]
'''


def _write_experiment(folder, text=EXPERIMENT):
  path = os.path.join(str(folder), "experiment.py")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  return _write_experiment(tmp_path_factory.mktemp("experiment"))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The trainers' environment: one CPU device (compiles faster than CI's 8 simulated ones; a
  sweep does not care) and a compilation cache shared by the runs of this module."""
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
          "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.fixture(scope="module")
def data_args(prepared_corpus, tokenizer):
  """The embedded corpus prepared once (not once per run), and the model's vocabulary to match."""
  return (f"--config.data.train_files={prepared_corpus.directory}",
          f"--config.model.vocab_size={tokenizer.vocab_size}")


def _sweep(repo_root, env, *args, timeout=180):
  return subprocess.run([sys.executable, "-m", "jaxlm.sweep", *args], cwd=repo_root, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _point(workdir, *parts):
  with open(os.path.join(workdir, *parts, "point.json"), encoding="utf-8") as f:
    return json.load(f)


def _final_eval(workdir):
  (row,) = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["step"] == 3]
  return row


def _md_row(markdown, name):
  """The cells of the first table row of point `name` in summary.md."""
  line = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
  return [c.strip() for c in line.strip("|").split(" | ")]


def _md_header(markdown):
  line = next(line for line in markdown.splitlines() if line.startswith("| point |"))
  return [c.strip() for c in line.strip("|").split(" | ")]


def _csv_rows(workdir):
  with open(os.path.join(workdir, "summary.csv"), encoding="utf-8", newline="") as f:
    return {row["point"]: row for row in csv.DictReader(f)}


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


# --- Checks before anything runs -------------------------------------------------------------


def test_dry_run_prints_one_command_per_run_and_runs_nothing(repo_root, experiment, tmp_path):
  workdir = str(tmp_path / "sweep")
  result = _sweep(repo_root, os.environ, f"--config={experiment}", f"--workdir={workdir}",
                  "--dry_run", "--config.train.steps=3", "--config.objectives.mlm.mask_rate", "0.2")
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()]
  assert [c[c.index("-m") + 1] for c in commands] == ["jaxlm.train"] * 3
  assert [c[c.index("-m") + 2:c.index("-m") + 4] for c in commands] == [
      [f"--config={experiment}", f"--workdir={os.path.join(workdir, name)}"]
      for name in ("a", "no_eval_data", "b")]
  assert commands[1][-3:] == ["--config.data.eval_files=/nonexistent/eval.txt",
                              "--config.train.steps=3", "--config.objectives.mlm.mask_rate=0.2"]
  # The command line wins over b's own mask rate, which is dropped with a note.
  assert commands[2][-2:] == ["--config.train.steps=3", "--config.objectives.mlm.mask_rate=0.2"]
  assert "point 'b' sets objectives.mlm.mask_rate=0.3" in result.stderr
  assert not any("seeds" in arg for c in commands for arg in c)

  result = _sweep(repo_root, os.environ, f"--config={experiment}", f"--workdir={workdir}",
                  "--dry_run", "--seeds=2", "--only=b,a")
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()]
  assert [(next(a for a in c if a.startswith("--workdir=")), c[-1]) for c in commands] == [
      (f"--workdir={os.path.join(workdir, name, f'seed_{s}')}", f"--config.seeds.init={s}")
      for name in ("a", "b") for s in (0, 1)]
  assert not os.path.exists(workdir)


@pytest.mark.parametrize("overrides, expected", [
    ({"objectives.mlm.mask_rat": 0.3}, ["'bad'", "objectives.mlm.mask_rat",
                                        "Did you mean 'objectives.mlm.mask_rate'?"]),
    ({"train.steps": "many"}, ["'bad'", "train.steps", "'many'"]),
    ({"train.steps": 0}, ["'bad'", "train.steps is 0"]),
])
def test_a_bad_point_is_refused_before_anything_runs(repo_root, tmp_path, overrides, expected):
  text = EXPERIMENT.replace('{"name": "a", "overrides": {}}',
                            f'{{"name": "bad", "overrides": {overrides!r}}}')
  experiment = _write_experiment(tmp_path, text)
  workdir = tmp_path / "sweep"
  result = _sweep(repo_root, os.environ, f"--config={experiment}", f"--workdir={workdir}")
  assert result.returncode != 0
  for part in expected:
    assert part in result.stderr, result.stderr
  assert "Traceback" not in result.stderr and not workdir.exists()


def test_unknown_point_names_are_refused(repo_root, experiment, tmp_path):
  result = _sweep(repo_root, os.environ, f"--config={experiment}", f"--workdir={tmp_path}/s",
                  "--only=a,c")
  assert result.returncode != 0
  assert "unknown points: c" in result.stderr and "a, no_eval_data, b" in result.stderr


# --- A sweep of three points, one of them failing ---------------------------------------------


@pytest.fixture(scope="module")
def swept(repo_root, experiment, env, data_args, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("swept") / "sweep")
  args = (f"--config={experiment}", f"--workdir={workdir}", *FAST, *data_args)
  return workdir, args, _sweep(repo_root, env, *args)


def test_a_failed_point_is_reported_and_the_next_still_runs(swept):
  workdir, _, result = swept
  assert result.returncode == 1, result.stdout + result.stderr
  assert "[2/3] no_eval_data failed with exit code 1" in result.stderr
  assert "/nonexistent/eval.txt" in result.stderr  # The end of its train.log.
  failed = _point(workdir, "no_eval_data")
  assert (failed["status"], failed["exit_code"], failed["attempts"]) == ("failed", 1, 1)
  for name in ("a", "b"):
    point = _point(workdir, name)
    assert (point["status"], point["exit_code"], point["seed"]) == ("finished", 0, None)
    assert point["wall_seconds"] > 0
  assert "--config.objectives.mlm.mask_rate=0.3" in _point(workdir, "b")["args"]
  assert "failed (exit 1)" in _read(os.path.join(workdir, "summary.md"))


def test_summary_holds_the_final_eval_values(swept):
  workdir, _, _ = swept
  markdown = _read(os.path.join(workdir, "summary.md"))
  header, rows = _md_header(markdown), _csv_rows(workdir)
  keys = ("eval/mlm_loss", "eval/mlm_accuracy", "eval/mlm_perplexity")
  assert header[3:6] == list(keys)
  for name in ("a", "b"):
    final = _final_eval(os.path.join(workdir, name))
    cells = _md_row(markdown, name)
    assert cells[1] == "finished"
    for key in keys:
      assert float(rows[name][f"{key}_mean"]) == final[key]
      assert cells[header.index(key)] == summary.format_value(final[key])
    assert rows[name]["eval/mlm_loss_std"] == ""
    assert float(rows[name]["tokens_seen_mean"]) == 3 * 16 * 64
    if "model_flops" in final:
      assert float(rows[name]["model_flops_mean"]) == final["model_flops"]
  assert rows["no_eval_data"]["eval/mlm_loss_mean"] == ""
  assert "## At equal compute" in markdown
  with open(os.path.join(workdir, "summary.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_running_again_skips_what_is_finished(repo_root, env, swept):
  workdir, args, _ = swept
  files = [os.path.join(workdir, name, f) for name in ("a", "b")
           for f in ("metrics.jsonl", "point.json", "train.log")]
  before = {f: (os.stat(f).st_mtime_ns, _read(f)) for f in files}
  result = _sweep(repo_root, env, *args)
  assert result.returncode == 1  # no_eval_data fails again.
  assert "[1/3] a: finished before, skipped" in result.stdout
  assert "[3/3] b: finished before, skipped" in result.stdout
  assert {f: (os.stat(f).st_mtime_ns, _read(f)) for f in files} == before  # No trainer ran.
  assert _point(workdir, "no_eval_data")["attempts"] == 2


def test_summarize_rebuilds_the_same_summary(repo_root, swept):
  workdir, _, _ = swept
  written = {name: _read(os.path.join(workdir, name)) for name in ("summary.md", "summary.csv")}
  for name in ("summary.md", "summary.csv", "summary.png"):
    os.remove(os.path.join(workdir, name))
  result = _sweep(repo_root, os.environ, "--summarize", workdir)
  assert result.returncode == 0, result.stderr
  assert {name: _read(os.path.join(workdir, name)) for name in written} == written
  assert os.path.exists(os.path.join(workdir, "summary.png"))
  assert result.stdout.split()[:6] == ["point", "status", "eval/mlm_loss", "tokens/s", "wall", "s"]


def test_a_changed_config_runs_a_finished_point_again(repo_root, env, swept):
  workdir, args, _ = swept
  before = _point(workdir, "a")
  result = _sweep(repo_root, env, *args, "--only=a", "--config.train.log_every=2")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "[1/1] a: running" in result.stdout
  after = _point(workdir, "a")
  assert after["fingerprint"] != before["fingerprint"]
  assert (after["status"], after["attempts"]) == ("finished", 2)
  assert after["wall_seconds"] > before["wall_seconds"]  # Summed over the starts.


def test_summarize_needs_a_sweep_folder(repo_root, tmp_path):
  result = _sweep(repo_root, os.environ, f"--summarize={tmp_path}")
  assert result.returncode != 0 and "No runs under" in result.stderr


# --- Seeds and stopping -----------------------------------------------------------------------


def test_seeds_run_apart_and_combine_as_mean_and_std(repo_root, experiment, env, data_args,
                                                     tmp_path):
  workdir = str(tmp_path / "sweep")
  result = _sweep(repo_root, env, f"--config={experiment}", f"--workdir={workdir}", "--seeds=2",
                  "--only=a", *FAST, *data_args)
  assert result.returncode == 0, result.stdout + result.stderr
  assert sorted(os.listdir(os.path.join(workdir, "a"))) == ["seed_0", "seed_1"]
  losses = []
  for seed in (0, 1):
    point = _point(workdir, "a", f"seed_{seed}")
    assert point["seed"] == seed and point["args"][-1] == f"--config.seeds.init={seed}"
    losses.append(_final_eval(os.path.join(workdir, "a", f"seed_{seed}"))["eval/mlm_loss"])
  assert losses[0] != losses[1]  # Another initialisation.
  mean, std = statistics.fmean(losses), statistics.stdev(losses)
  row = _csv_rows(workdir)["a"]
  assert float(row["eval/mlm_loss_mean"]) == pytest.approx(mean, rel=1e-12)
  assert float(row["eval/mlm_loss_std"]) == pytest.approx(std, rel=1e-12)
  markdown = _read(os.path.join(workdir, "summary.md"))
  cells = _md_row(markdown, "a")
  assert cells[1] == "finished (2 seeds)"
  assert cells[_md_header(markdown).index("eval/mlm_loss")] == (
      f"{summary.format_value(mean)} ± {summary.format_value(std)}")


def test_sigterm_stops_the_trainer_and_the_sweep(repo_root, experiment, env, data_args,
                                                 tmp_path):
  workdir = str(tmp_path / "sweep")
  sweep = subprocess.Popen(
      [sys.executable, "-m", "jaxlm.sweep", f"--config={experiment}", f"--workdir={workdir}",
       "--only=a,b", *FAST, *data_args],
      cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  point_file = os.path.join(workdir, "a", "point.json")
  deadline = time.monotonic() + 60
  while "pid" not in (summary.read_json(point_file) or {}) and time.monotonic() < deadline:
    time.sleep(0.05)
  sweep.send_signal(signal.SIGTERM)
  _, stderr = sweep.communicate(timeout=120)
  assert sweep.returncode == 128 + signal.SIGTERM, stderr
  assert "Run the same command to resume it" in stderr
  point = _point(workdir, "a")
  assert point["status"] == "stopped"
  with pytest.raises(ProcessLookupError):  # The trainer is gone, not left running.
    os.kill(point["pid"], 0)
  assert not os.path.exists(os.path.join(workdir, "b"))  # The sweep stopped there.


# --- The summary's arithmetic, on synthetic runs ----------------------------------------------


def test_mean_std():
  assert summary.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
  assert summary.mean_std([5.0]) == (5.0, None)
  assert summary.mean_std([None, None]) == (None, None)
  mean, std = summary.mean_std([1.0, None, 4.0])
  assert mean == 2.5 and std == pytest.approx(math.sqrt(4.5))  # Sample std: n - 1.


def test_interpolate():
  rows = [{"step": 1, "x": 10.0, "y": 3.0}, {"step": 2, "x": 20.0, "y": 2.0, "z": 7.0},
          {"step": 3, "x": 30.0, "y": 1.5}, {"step": 4, "y": 9.0}]  # No x: not a point.
  assert summary.interpolate(rows, "x", 15.0, ["y", "step"]) == {"y": 2.5, "step": 1.5}
  assert summary.interpolate(rows, "x", 10.0, ["y"]) == {"y": 3.0}
  assert summary.interpolate(rows, "x", 30.0, ["y"]) == {"y": 1.5}
  assert summary.interpolate(rows, "x", 5.0, ["y"]) == {}  # Nothing at or below: no value.
  assert summary.interpolate(rows, "x", 31.0, ["y"]) == {}
  assert summary.interpolate(rows, "x", 25.0, ["z"]) == {}  # z only at x = 20.
  assert summary.interpolate(rows, "x", 20.0, ["z"]) == {"z": 7.0}


def _synthetic_run(folder, name, flops_per_step, eval_steps, losses, *, seed=None, steps=4,
                   with_counts=True, index=0, point=True):
  """A finished run folder as the sweep and the trainer leave it, with chosen numbers."""
  os.makedirs(folder)
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    json.dump({"train": {"steps": steps}, "data": {"batch_size": 2, "seq_len": 8}}, f)
  if point:
    with open(os.path.join(folder, "point.json"), "w", encoding="utf-8") as f:
      json.dump({"name": name, "index": index, "seed": seed, "overrides": {"k": name},
                 "status": "finished", "exit_code": 0, "wall_seconds": 10.0 + (seed or 0)}, f)
  with open(os.path.join(folder, "metrics.jsonl"), "w", encoding="utf-8") as f:
    for step in range(1, steps + 1):
      row = {"step": step, "loss": 5.0, "tokens_per_sec": 100.0 * step}
      if with_counts:
        row.update(tokens_seen=16 * step, model_flops=flops_per_step * step)
      f.write(json.dumps(row) + "\n")
      if step in eval_steps:
        loss = losses[eval_steps.index(step)]
        row = {"step": step, "eval/loss": loss, "eval/mlm_loss": loss,
               "eval/mlm_accuracy": 1.0 / loss}
        if with_counts:
          row["model_flops"] = flops_per_step * step
        f.write(json.dumps(row) + "\n")


def test_summary_at_equal_compute_on_synthetic_runs(tmp_path):
  sweep = str(tmp_path)
  _synthetic_run(os.path.join(sweep, "cheap"), "cheap", 1e9, [2, 4], [4.0, 3.0], index=0)
  for seed, losses in ((0, [4.0, 3.0, 2.5, 2.0]), (1, [5.0, 3.5, 2.7, 2.2])):
    _synthetic_run(os.path.join(sweep, "dear", f"seed_{seed}"), "dear", 2e9, [1, 2, 3, 4],
                   losses, seed=seed, index=1)
  _synthetic_run(os.path.join(sweep, "late"), "late", 2e9, [3, 4], [2.0, 1.0], index=2)
  points, keys, budget = summary.build_points(summary.find_runs(sweep))
  assert keys == ["eval/mlm_loss", "eval/mlm_accuracy"]
  assert budget == ("cheap", 4e9)
  cheap, dear, late = points
  assert cheap.at_budget["eval/mlm_loss"] == (3.0, None)
  assert cheap.at_budget["step"] == (4.0, None)
  # dear reaches 4e9 FLOPs at step 2, where its seeds logged 3.0 and 3.5.
  assert dear.at_budget["eval/mlm_loss"] == (3.25, pytest.approx(statistics.stdev([3.0, 3.5])))
  assert dear.at_budget["step"] == (2.0, 0.0)
  assert late.at_budget["eval/mlm_loss"] == (None, None)  # First eval row at 6e9.
  assert late.at_budget["step"] == (2.0, None)
  assert dear.final["eval/mlm_loss"] == (2.1, pytest.approx(statistics.stdev([2.0, 2.2])))
  assert dear.final["tokens_per_sec"] == (300.0, 0.0)  # Rows 2-4: 200, 300, 400.
  assert dear.final["wall_seconds"] == (10.5, pytest.approx(statistics.stdev([10.0, 11.0])))
  assert dear.final["model_flops"] == (8e9, 0.0)

  summary.summarize(sweep)
  markdown = _read(os.path.join(sweep, "summary.md"))
  equal = markdown[markdown.index("## At equal compute"):]
  assert "4.000e+09 model FLOPs, what the cheapest point (`cheap`)" in equal
  assert _md_row(equal, "dear")[:3] == ["dear", "2 ± 0", "3.25 ± 0.3536"]
  # late reaches the budget at step 2 (its train rows say), but has no eval row that early.
  assert _md_row(equal, "late") == ["late", "2", "", ""]
  assert _md_row(markdown, "dear")[:4] == ["dear", "finished (2 seeds)", "k=dear", "2.1 ± 0.1414"]


def test_summary_without_counts_falls_back_and_leaves_flops_empty(tmp_path):
  """Rows of an older trainer (no tokens_seen or model_flops): tokens seen from the config,
  FLOPs empty, and no table at equal compute."""
  sweep = str(tmp_path)
  _synthetic_run(os.path.join(sweep, "old"), "old", 1e9, [4], [3.0], with_counts=False)
  summary.summarize(sweep)
  row = _csv_rows(sweep)["old"]
  assert float(row["tokens_seen_mean"]) == 4 * 2 * 8 and row["model_flops_mean"] == ""
  assert "nothing to compare at equal compute" in _read(os.path.join(sweep, "summary.md"))


def test_runs_started_by_a_scheduler_are_named_by_their_folder(tmp_path):
  """Folders run from --dry_run commands have no point.json: the path names point and seed."""
  sweep = str(tmp_path)
  for seed in (0, 1):
    _synthetic_run(os.path.join(sweep, "x", f"seed_{seed}"), "", 1e9, [4], [3.0 + seed],
                   point=False)
  _synthetic_run(os.path.join(sweep, "y"), "", 1e9, [2], [3.0], point=False)  # Unfinished.
  runs = summary.find_runs(sweep)
  assert [(r.name, r.seed, r.finished) for r in runs] == [
      ("x", 0, True), ("x", 1, True), ("y", None, False)]
  summary.summarize(sweep)
  markdown = _read(os.path.join(sweep, "summary.md"))
  assert _md_row(markdown, "x")[1:4] == ["finished (2 seeds)", "?", "3.5 ± 0.7071"]
  assert _md_row(markdown, "y")[1] == "unfinished at step 4/4"
