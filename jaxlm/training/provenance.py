"""`<workdir>/runs.jsonl`: one record per start of a run, appended, never rewritten.

`config.json` holds only the latest resolved config; a workdir resumed with other overrides, on
another machine or after a code change keeps the history of every start here: what ran (config,
jaxlm's version and git commit, package versions), where (devices, processes) and on what data
(the dataset fingerprint), from which step.
"""

import datetime
import importlib.metadata
import json
import os
import subprocess

import jax
import ml_collections

import jaxlm

RUNS_FILE = "runs.jsonl"
# The packages whose versions change numbers or behaviour.
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "sentencepiece",
             "ml_collections")


def git_commit() -> dict:
  """The commit of jaxlm's checkout and whether it had uncommitted changes; empty when jaxlm is
  not in a git checkout (an installed wheel) or git is missing."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(jaxlm.__file__)))

  def git(*args):
    return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()

  try:
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
  except (OSError, subprocess.SubprocessError):
    return {}


def _package_versions() -> dict[str, str | None]:
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def start_record(config: ml_collections.ConfigDict, *, start_step: int,
                 data_fingerprint: str) -> dict:
  devices = jax.devices()
  return {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "start_step": start_step,
      "jaxlm_version": jaxlm.__version__,
      "git": git_commit(),
      "packages": _package_versions(),
      "devices": {"kind": devices[0].device_kind, "platform": devices[0].platform,
                  "count": len(devices), "processes": jax.process_count()},
      "data_fingerprint": data_fingerprint,
      "config": json.loads(config.to_json_best_effort(sort_keys=True)),
  }


def append_start(workdir: str, config: ml_collections.ConfigDict, *, start_step: int,
                 data_fingerprint: str) -> dict:
  """Appends this start's record to `<workdir>/runs.jsonl` (process 0 only) and returns it."""
  record = start_record(config, start_step=start_step, data_fingerprint=data_fingerprint)
  with open(os.path.join(workdir, RUNS_FILE), "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
  return record


def last_start(workdir: str) -> dict | None:
  """The latest record of `runs.jsonl`, or None for a new workdir (or an unreadable last line)."""
  try:
    with open(os.path.join(workdir, RUNS_FILE), encoding="utf-8") as f:
      lines = f.read().splitlines()
    return json.loads(lines[-1]) if lines else None
  except (OSError, ValueError):
    return None
