"""Run the points of an experiment one after another, then summarize them.

  python -m jaxlm.sweep --config=experiments/ablation_objectives.py --workdir=runs/objectives \\
      [--config.k=v ...] [--seeds=N] [--only=NAME,...] [--dry_run]
  python -m jaxlm.sweep --summarize runs/objectives

**The experiment file** is an ordinary config file (`python -m jaxlm.train` runs its
`get_config()` alone) that also has a `get_sweep()` returning the points, a list of dicts:

  def get_sweep():
    return [
        {"name": "mlm", "overrides": {}},
        {"name": "plm", "overrides": {"objectives.mlm.weight": 0.0, "objectives.plm.weight": 1.0}},
    ]

`name` names the point's folder (letters, digits, `.`, `_`, `-`); `overrides` maps dotted keys
of the base config to values of the key's type (bool, int, float or str). Before anything runs,
every point is checked: a key the config lacks is an error naming the point and the key, and so
are a value of the wrong type and a resolved config that fails the trainer's checks across keys
(`jaxlm.config.validate`). What needs the data or JAX (an objective on a format it cannot train
on, a missing file) is found when that run starts: it fails, and the sweep goes on.

**Overrides.** Each run is `python -m jaxlm.train --config=<the file> --workdir=<run dir>`
followed by the point's overrides as `--config.key=value`, then the command line's `--config.`
overrides as typed. The command line applies to every point and wins over a point's override of
the same key (that one is dropped, with a note): it is the user's last word, e.g.
`--config.train.steps=30` for a quick pass over the whole sweep.

**Seeds.** With `--seeds=N` (N > 1) each point runs N times: seed s in 0..N-1 passes
`--config.seeds.init=s` (`--config.train.seed=s` with a config that has no `seeds` section), in
`<workdir>/<name>/seed_<s>`. With N = 1 (the default) a point runs once in `<workdir>/<name>`
with the seeds its config gives, so that it is exactly `jaxlm.train` with those overrides.

**Each run** writes `train.log` (the trainer's stdout and stderr, appended at each start) and
`point.json` (name, index, seed, overrides, the trainer's arguments and command, a fingerprint
of the resolved config, status running | finished | failed | stopped, exit code, the trainer's
pid, wall seconds and attempts summed over restarts) beside the trainer's own files. A run is
*finished* when point.json says so for the same resolved config as now (the experiment's
`get_config()` with the point's and the command line's overrides) and `metrics.jsonl` has the
eval row of the final step (`train.steps` in the run's `config.json`). A finished run is
skipped; any other is started again and the trainer resumes from its newest checkpoint. So the
same command after a kill or a failure redoes only what is missing, and a changed config (a
larger `--config.train.steps`, an edited experiment file) runs every point again: the trainer
extends a longer run, and refuses a checkpoint of another model (use a new workdir for that).

**Failures** (a non-zero exit) are reported with the end of `train.log`, and the sweep goes on;
it exits 1 when a run failed or stopped unfinished. **Ctrl-C or SIGTERM** passes one SIGTERM to
the running trainer, which saves a checkpoint at the end of its step and exits; the sweep then
stops (exit 128 + the signal). A second signal kills the trainer at once (it resumes from its
previous checkpoint). The trainer runs in its own session, so that a terminal's Ctrl-C reaches
it once, through the sweep; a sweep killed with SIGKILL leaves it running.

**`--dry_run`** checks the points and prints one shell command per run, for a scheduler; it runs
and writes nothing. **The summary** (`summary.md`, `summary.csv`, `summary.png` in the workdir,
of every run under it) is written after the runs and by `--summarize DIR`: see
`jaxlm/analysis/summary.py`.
"""

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxlm import cli, config as config_lib
from jaxlm.errors import UserError, closest
from jaxlm.analysis import summary

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file: get_config() is the base config, get_sweep() the points.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep folder: one folder per point (and seed).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Init seeds per point; seed s sets seeds.init=s.",
                              lower_bound=1)
_ONLY = flags.DEFINE_list("only", [], "Run only these points (comma-separated names).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print one shell command per run; run nothing.")
_SUMMARIZE = flags.DEFINE_string("summarize", None,
                                 "Write the summary of this sweep folder and exit (no --config).")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOG_TAIL_LINES = 15


@dataclasses.dataclass(frozen=True)
class Run:
  """One trainer run of the sweep: a point with one seed."""

  name: str
  index: int  # The point's place in get_sweep().
  seed: int | None  # None: one run per point, with the config's seeds.
  overrides: dict  # The point's own, as get_sweep() gives them.
  args: tuple[str, ...]  # Every --config.key=value passed to the trainer.
  fingerprint: str  # Of the resolved config: a finished run with another one is run again.
  workdir: str
  command: tuple[str, ...]


def load_points(config_file: str) -> list[dict]:
  """`get_sweep()` of the experiment file, checked for shape (not yet for keys), each point with
  its `index` in the list added. `config_file` is `--config`'s value: `path[:arg]`, the `arg` for
  `get_config()` alone, as ml_collections reads it."""
  path = config_file.split(":", 1)[0]
  if not os.path.isfile(path):
    raise UserError(f"--config: no file '{path}'.")
  spec = importlib.util.spec_from_file_location("jaxlm_sweep_experiment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise UserError(f"{path} has no get_sweep(): a sweep's experiment file returns its points "
                    "there, e.g. [{'name': 'mlm', 'overrides': {'objectives.mlm.weight': 1.0}}].")
  points, seen = module.get_sweep(), set()
  for point in points:
    if not isinstance(point, dict) or set(point) - {"name", "overrides"} or "name" not in point:
      raise UserError(f"{path}: each point of get_sweep() is a dict with 'name' and 'overrides' "
                      f"only; got {point!r}.")
    name = point["name"]
    if not isinstance(name, str) or not _NAME.match(name) or name in seen:
      raise UserError(f"{path}: point name {name!r} is repeated or not a folder name (letters, "
                      "digits, '.', '_', '-').")
    seen.add(name)
    if not isinstance(point.setdefault("overrides", {}), dict):
      raise UserError(f"{path}: the overrides of point '{name}' must be a dict of key: value.")
  return [dict(point, index=index) for index, point in enumerate(points)]


def cli_overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """The command line's config overrides, in order, as (key, `--config.key=value`).

  Taken from argv as typed rather than re-serialised from parsed values, so that the trainer
  parses exactly what the user wrote; `--config.k v`, a bare boolean and `--noconfig.k` are
  spelt out.
  """
  out = []
  args = iter(argv[1:])
  for arg in args:
    if arg == "--":
      break
    name, equals, value = arg.lstrip("-").partition("=")
    negated = name.startswith("noconfig.")
    if not (name.startswith("config.") or negated):
      continue
    key = name.split(".", 1)[1]
    if negated:
      value = "False"
    elif not equals:
      value = "True" if flags.FLAGS[name].boolean else next(args, "")
    out.append((key, f"--config.{key}={value}"))
  return out


def _all_keys(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in node.items():
    is_section = isinstance(value, ml_collections.ConfigDict)
    keys += _all_keys(value, f"{prefix}{key}.") if is_section else [prefix + key]
  return keys


def _set(config: ml_collections.ConfigDict, key: str, value) -> str | None:
  """Sets a dotted key as the trainer would; returns what is wrong, or None."""
  node, parts = config, key.split(".")
  for part in parts[:-1]:
    node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
  if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
    return f"unknown config key '{key}'.{closest(key, _all_keys(config))}"
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    return f"'{key}' is a section; override its keys one by one."
  if not isinstance(value, (bool, int, float, str)):
    return f"the value of '{key}' is {value!r}; use a bool, int, float or str."
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    return f"bad value {value!r} for '{key}': {e}"
  return None


def _as_arg(value) -> str:
  return value if isinstance(value, str) else repr(value)


def plan(config: ml_collections.ConfigDict, config_file: str, points: Sequence[dict],
         overrides: Sequence[tuple[str, str]], seeds: int, sweep_dir: str) -> list[Run]:
  """The runs of the points, each checked as the trainer will resolve it (`config` already
  holds the command line's overrides); every problem is reported at once, before any run."""
  from_cli = {key for key, _ in overrides}
  seed_key = "seeds.init" if "seeds" in config else "train.seed"
  problems, runs = [], []
  if seeds > 1 and seed_key in from_cli:
    problems.append(f"--seeds={seeds} sets {seed_key} per run; drop --config.{seed_key}.")
  for point in points:
    name, index = point["name"], point["index"]
    resolved, args = config.copy_and_resolve_references(), []
    for key, value in point["overrides"].items():
      target = config.copy_and_resolve_references() if key in from_cli else resolved
      if problem := _set(target, key, value):
        problems.append(f"point '{name}': {problem}")
      elif seeds > 1 and key == seed_key:
        problems.append(f"point '{name}' sets {seed_key}, which --seeds={seeds} sets per run.")
      elif key in from_cli:
        print(f"Note: point '{name}' sets {key}={value}; the command line's value wins.",
              file=sys.stderr)
      else:
        args.append(f"--config.{key}={_as_arg(value)}")
    for seed in range(seeds) if seeds > 1 else [None]:
      run_args = [*args, *(arg for _, arg in overrides)]
      workdir = os.path.join(sweep_dir, name)
      if seed is not None:
        _set(resolved, seed_key, seed)
        run_args.append(f"--config.{seed_key}={seed}")
        workdir = os.path.join(workdir, f"seed_{seed}")
      try:
        config_lib.validate(resolved)
      except UserError as e:
        problems.append(f"point '{name}': {e}")
      fingerprint = hashlib.sha256(
          resolved.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]
      command = (sys.executable, "-m", "jaxlm.train", f"--config={config_file}",
                 f"--workdir={workdir}", *run_args)
      runs.append(Run(name, index, seed, dict(point["overrides"]), tuple(run_args), fingerprint,
                      workdir, command))
  if problems:
    raise UserError("The sweep was not started:\n  " + "\n  ".join(dict.fromkeys(problems)))
  return runs


def _point_file(run: Run) -> str:
  return os.path.join(run.workdir, summary.POINT_FILE)


def is_finished(run: Run) -> bool:
  """point.json says finished for this resolved config, and the final eval row is there."""
  record = summary.read_json(_point_file(run)) or {}
  return (record.get("status") == "finished" and record.get("fingerprint") == run.fingerprint
          and summary.reached_final_eval(run.workdir))


def _write_json(path: str, record: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)  # Never a cut point.json, whenever the sweep is killed.


class _Stop:
  """Ctrl-C / SIGTERM: one SIGTERM to the running trainer (it checkpoints and exits), then the
  sweep stops; a second signal kills the trainer."""

  def __init__(self):
    self.signum, self.count, self.child, self.forwarded = None, 0, None, False
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

  def _handle(self, signum, frame) -> None:
    del frame
    self.count += 1
    self.signum = self.signum or signum
    action = ("stopping the running trainer at the end of its step (a checkpoint), then the "
              "sweep" if self.count == 1 else "killing the running trainer")
    # os.write, not print: a handler that prints while the loop prints raises RuntimeError.
    os.write(sys.stderr.fileno(), f"\nGot {signal.Signals(signum).name}: {action}.\n".encode())
    self.signal_child()

  def signal_child(self) -> None:
    child = self.child
    if self.count == 0 or child is None or child.poll() is not None:
      return
    if self.count > 1:
      child.kill()
    elif not self.forwarded:
      self.forwarded = True
      child.terminate()

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run_one(run: Run, stop: _Stop) -> dict:
  """Runs (or resumes) the trainer of one run; returns its point.json record."""
  os.makedirs(run.workdir, exist_ok=True)
  before = summary.read_json(_point_file(run)) or {}
  record = dict(name=run.name, index=run.index, seed=run.seed, overrides=run.overrides,
                args=list(run.args), command=list(run.command), fingerprint=run.fingerprint,
                status="running", exit_code=None, wall_seconds=before.get("wall_seconds", 0.0),
                attempts=before.get("attempts", 0) + 1)
  _write_json(_point_file(run), record)
  started = time.monotonic()
  with open(os.path.join(run.workdir, "train.log"), "a", encoding="utf-8") as log:
    log.write(f"==== jaxlm.sweep, attempt {record['attempts']}, "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(run.command)}\n")
    log.flush()
    child = subprocess.Popen(run.command, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    stop.child, stop.forwarded = child, False
    _write_json(_point_file(run), {**record, "pid": child.pid})
    stop.signal_child()  # A signal that came before the child did.
    code = child.wait()
    stop.child = None
  record["wall_seconds"] += time.monotonic() - started
  record.update(exit_code=code, pid=child.pid)
  if code == 0 and summary.reached_final_eval(run.workdir):
    record["status"] = "finished"
  else:  # Stopped: by the sweep's signal, or exited 0 before its last step (told to stop).
    record["status"] = "failed" if code != 0 and stop.count == 0 else "stopped"
  _write_json(_point_file(run), record)
  return record


def _log_tail(run: Run) -> str:
  with open(os.path.join(run.workdir, "train.log"), encoding="utf-8", errors="replace") as f:
    lines = f.read().splitlines()[-_LOG_TAIL_LINES:]
  return "\n".join("    " + line for line in lines)


def run_sweep(runs: Sequence[Run]) -> int:
  """Runs what is not finished, one after another; returns the sweep's exit status."""
  stop, unfinished = _Stop(), []
  try:
    for number, run in enumerate(runs, 1):
      seed = "" if run.seed is None else f" seed {run.seed}"
      label = f"[{number}/{len(runs)}] {run.name}{seed}"
      if stop.count:
        break
      if is_finished(run):
        print(f"{label}: finished before, skipped", flush=True)
        continue
      print(f"{label}: running, log in {os.path.join(run.workdir, 'train.log')}", flush=True)
      record = run_one(run, stop)
      print(f"{label}: {record['status']} (exit {record['exit_code']}) after "
            f"{record['wall_seconds']:.1f} s in all", flush=True)
      if record["status"] != "finished":
        unfinished.append(run)
      if record["status"] == "failed":
        print(f"{label} failed with exit code {record['exit_code']}; the end of "
              f"{os.path.join(run.workdir, 'train.log')}:\n{_log_tail(run)}", file=sys.stderr,
              flush=True)
  finally:
    stop.restore()
  if stop.count:
    print("Sweep stopped. Run the same command to resume it.", file=sys.stderr)
    return 128 + stop.signum
  if unfinished:
    print(f"Unfinished: {', '.join(sorted({r.name for r in unfinished}))} (see above). Run the "
          "same command again to retry them.", file=sys.stderr)
  return 1 if unfinished else 0


def write_summary(sweep_dir: str) -> None:
  table = summary.summarize(sweep_dir)
  if table is None:
    raise UserError(f"No runs under '{sweep_dir}': a sweep folder holds one folder per run, "
                    "with point.json or metrics.jsonl.")
  print(f"\n{table}\n\nSummary: {os.path.join(sweep_dir, 'summary.md')} (.csv, .png)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _SUMMARIZE.value:
    if not os.path.isdir(_SUMMARIZE.value):
      raise UserError(f"--summarize: no folder '{_SUMMARIZE.value}'.")
    write_summary(_SUMMARIZE.value)
    return
  if _CONFIG.value is None or not _WORKDIR.value:
    raise UserError("Give --config=EXPERIMENT_FILE and --workdir=DIR (or --summarize=DIR).")
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  points = load_points(config_file)
  if unknown := [n for n in _ONLY.value if n not in {p["name"] for p in points}]:
    raise UserError(f"--only names unknown points: {', '.join(unknown)}. The points of "
                    f"{config_file}: {', '.join(p['name'] for p in points)}.")
  chosen = [p for p in points if not _ONLY.value or p["name"] in _ONLY.value]
  runs = plan(_CONFIG.value, config_file, chosen, cli_overrides(sys.argv), _SEEDS.value,
              _WORKDIR.value)
  if _DRY_RUN.value:
    print("\n".join(shlex.join(run.command) for run in runs))
    return
  status = run_sweep(runs)
  if status < 128:  # Not after Ctrl-C / SIGTERM: stop at once, as asked.
    write_summary(_WORKDIR.value)
  sys.exit(status)


if __name__ == "__main__":
  sys.exit(cli.run(main))
