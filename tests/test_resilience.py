"""Runs that die: SIGKILL at random moments, SIGTERM, non-finite losses, bad settings.

The SIGKILL test is the exact-resume guarantee: a run killed at random moments (saves
included) and restarted with the same command logs exactly the losses of an uninterrupted run.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxlm.training.metrics import read_metrics

STEPS = 40


def _command(repo_root, workdir, tokenizer_path, *extra):
  return [
      sys.executable, "-m", "jaxlm.train",
      f"--config={os.path.join(repo_root, 'experiments', 'bert_tiny.py')}",
      f"--workdir={workdir}",
      f"--config.data.tokenizer={tokenizer_path}",
      "--config.model.vocab_size=512",
      f"--config.train.steps={STEPS}",
      "--config.train.log_every=1",
      "--config.train.checkpoint_every=3",
      f"--config.train.eval_every={STEPS}",
      "--config.data.eval_examples=16",
      "--config.data.batch_size=16",
      "--config.model.dropout_rate=0.1",
      "--config.model.attention_dropout_rate=0.1",
      *extra,
  ]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return env


def _logged(workdir) -> int:
  """The highest step logged so far (0 if none)."""
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return 0
  return max(_losses(workdir), default=0)


def _losses(workdir):
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(repo_root, tokenizer, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  done = subprocess.run(_command(repo_root, workdir, tokenizer.path), cwd=repo_root, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


def test_sigkill_at_random_moments_then_resume_is_exact(repo_root, tokenizer, tmp_path, reference):
  rng = np.random.default_rng(1234)
  workdir = str(tmp_path / "killed")
  command = _command(repo_root, workdir, tokenizer.path)
  kills = 0
  while kills < 3:
    process = subprocess.Popen(command, cwd=repo_root, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    if kills == 0:  # During start-up (tokenizer, compile) or the first steps.
      time.sleep(float(rng.uniform(1.0, 4.0)))
    else:  # Mid-training, a random number of steps past where the last life got to.
      target = min(STEPS - 2, max(_logged(workdir), 1) + int(rng.integers(3, 12)))
      deadline = time.time() + 120
      while _logged(workdir) < target and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
      time.sleep(float(rng.uniform(0.0, 0.15)))  # Lands inside a step, a log or a save.
    if process.poll() is not None:
      pytest.fail(f"the run ended before it was killed:\n{process.stderr.read()[-3000:]}")
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    kills += 1
  finished = subprocess.run(command, cwd=repo_root, env=_env(), capture_output=True, text=True,
                            timeout=300)
  assert finished.returncode == 0, finished.stderr[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == sorted(reference)
  for step, loss in reference.items():
    assert losses[step] == loss, f"step {step}: {losses[step]!r} != {loss!r}"
  leftovers = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
  assert not leftovers


def test_sigterm_saves_and_exits_zero_then_resume_is_exact(repo_root, tokenizer, tmp_path,
                                                           reference):
  workdir = str(tmp_path / "preempted")
  command = _command(repo_root, workdir, tokenizer.path)
  process = subprocess.Popen(command, cwd=repo_root, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  metrics = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline and not (os.path.exists(metrics) and len(_losses(workdir)) >= 4):
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 0, stderr[-3000:]
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  stopped_at = max(_losses(workdir))
  assert saved and saved[-1] == stopped_at < STEPS, (saved, stopped_at)
  assert "Stopped at step" in stderr
  finished = subprocess.run(command, cwd=repo_root, env=_env(), capture_output=True, text=True,
                            timeout=300)
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert _losses(workdir) == reference


def test_huge_learning_rate_stops_with_a_message(repo_root, tokenizer, tmp_path):
  done = subprocess.run(
      _command(repo_root, str(tmp_path / "diverged"), tokenizer.path,
               "--config.optimizer.learning_rate=1e9", "--config.train.steps=60"),
      cwd=repo_root, env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert "Traceback" not in done.stderr
  assert "non-finite" in done.stderr or "diverged" in done.stderr


def test_batch_not_divisible_by_the_data_axes(repo_root, tokenizer, tmp_path):
  env = _env()
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  done = subprocess.run(
      _command(repo_root, str(tmp_path / "w"), tokenizer.path, "--config.data.batch_size=12",
               "--config.mesh.data=8"),
      cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert "Traceback" not in done.stderr
  assert "data.batch_size (12)" in done.stderr


def test_unwritable_workdir_fails_at_start(repo_root, tokenizer, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  done = subprocess.run(_command(repo_root, str(blocker / "run"), tokenizer.path),
                        cwd=repo_root, env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert "Traceback" not in done.stderr
  assert "not writable" in done.stderr
