"""The summary of a sweep folder: `summary.md`, `summary.csv` and `summary.png`.

It reads only what the runs wrote, so that `python -m jaxlm.sweep --summarize DIR` needs no
config and rebuilds the same files at any time: each run folder's `point.json` (written by the
sweep), the trainer's `config.json` and `metrics.jsonl` beside it. A run folder with a
`metrics.jsonl` but no `point.json` (started by a scheduler from a `--dry_run` command) is read
too, named by its path (`<name>/seed_<s>` gives point `<name>`, seed `s`).

A run counts in the tables once it is finished: `metrics.jsonl` has an eval row at its final step
(`train.steps` of its `config.json`); an unfinished run shows in the status column and as a
curve of the plot. Seeds of a point combine as mean ± sample standard deviation (n - 1), so
that the spread of two seeds is not understated.

Equal compute: the cheapest point's total model FLOPs is the budget; every point's eval metrics
are interpolated linearly at that budget between its eval rows (x = cumulative `model_flops` of
the eval row). A point with no eval row at or below the budget gets empty cells: extrapolating
towards the untrained model would invent numbers. Runs whose rows lack `model_flops` (older
trainers) have no FLOPs, hence no place in that table.
"""

import collections
import csv
import dataclasses
import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence

from jaxlm.analysis.runs import read_metrics

POINT_FILE = "point.json"
_EVAL_KEY = re.compile(r"^eval/(\w+)_(loss|accuracy|perplexity)$")
_OBJECTIVE_ORDER = ("mlm", "nsp", "plm", "clm")
_SUFFIX_ORDER = ("loss", "accuracy", "perplexity")
_SEED_DIR = re.compile(r"^seed_(\d+)$")
# Columns after the eval metrics: (key, header). tokens seen and FLOPs are the same for every
# seed of a point, so the Markdown shows their mean alone.
_COST_COLUMNS = (("tokens_seen", "tokens seen"), ("model_flops", "model FLOPs"),
                 ("tokens_per_sec", "tokens/s"), ("wall_seconds", "wall s"))
_SPREAD_HIDDEN = ("tokens_seen", "model_flops")


def read_json(path: str) -> dict | None:
  """A JSON file's object, or None when it is missing or cut (a kill while writing)."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def final_step(workdir: str) -> int | None:
  """`train.steps` of the trainer's `config.json` in `workdir` (rewritten at every start)."""
  config = read_json(os.path.join(workdir, "config.json"))
  try:
    return int(config["train"]["steps"])
  except (TypeError, KeyError, ValueError):
    return None


def _read_rows(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  return read_metrics(path) if os.path.exists(path) else []


def _has_final_eval(rows: Sequence[dict], last_step: int | None) -> bool:
  return last_step is not None and any(r["step"] == last_step and "eval/loss" in r for r in rows)


def reached_final_eval(workdir: str) -> bool:
  """True when the run in `workdir` logged its eval row at its final step."""
  return _has_final_eval(_read_rows(workdir), final_step(workdir))


@dataclasses.dataclass
class Run:
  """One training run of a sweep point (one seed), as read from its folder."""

  name: str
  seed: int | None
  index: int  # The point's place in its sweep, for the order of the rows.
  overrides: dict | None  # The point's own overrides; None when unknown (no point.json).
  status: str  # point.json's: running | finished | failed | stopped; "" without point.json.
  exit_code: int | None
  wall_seconds: float | None
  final_step: int | None
  rows: list[dict]  # metrics.jsonl, merged per step.
  tokens_per_step: int | None  # data.batch_size x data.seq_len, for rows without tokens_seen.

  @property
  def finished(self) -> bool:
    return _has_final_eval(self.rows, self.final_step)

  def describe(self) -> str:
    if self.finished:
      return "finished"
    if self.status == "failed":
      return f"failed (exit {self.exit_code})"
    last = max((r["step"] for r in self.rows), default=0)
    return f"{self.status or 'unfinished'} at step {last}/{self.final_step or '?'}"


def load_run(workdir: str, sweep_dir: str) -> Run:
  """The run in `workdir`, from its point.json when there is one, else named by its path."""
  point = read_json(os.path.join(workdir, POINT_FILE)) or {}
  relative = os.path.relpath(workdir, sweep_dir)
  parent, leaf = os.path.split(relative)
  seed_dir = _SEED_DIR.match(leaf)
  config = read_json(os.path.join(workdir, "config.json")) or {}
  data = config.get("data", {})
  tokens_per_step = (data["batch_size"] * data["seq_len"]
                     if "batch_size" in data and "seq_len" in data else None)
  return Run(
      name=point.get("name") or (parent if seed_dir and parent else relative),
      seed=point.get("seed", int(seed_dir.group(1)) if seed_dir else None),
      index=point.get("index", 1 << 30),
      overrides=point.get("overrides"),
      status=point.get("status", ""),
      exit_code=point.get("exit_code"),
      wall_seconds=point.get("wall_seconds"),
      final_step=final_step(workdir),
      rows=_read_rows(workdir),
      tokens_per_step=tokens_per_step,
  )


def find_runs(sweep_dir: str) -> list[Run]:
  """Every run under `sweep_dir`, in sweep order, then by name and seed."""
  runs = []
  for folder, subfolders, files in os.walk(sweep_dir):
    # A trainer's own folders hold no runs; skipping them keeps the walk short.
    subfolders[:] = sorted(d for d in subfolders
                           if d not in ("checkpoints", "tensorboard", "prepared"))
    if POINT_FILE in files or "metrics.jsonl" in files:
      runs.append(load_run(folder, sweep_dir))
  return sorted(runs, key=lambda r: (r.index, r.name, -1 if r.seed is None else r.seed))


def number(row: dict, key: str) -> float | None:
  """`row[key]` as a float; the writer stores non-finite values as strings ("nan")."""
  value = row.get(key)
  if isinstance(value, bool) or value is None:
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation of the values given (None skipped); std is None for
  fewer than two values."""
  present = [v for v in values if v is not None]
  if not present:
    return None, None
  if len(present) == 1:
    return present[0], None
  return statistics.fmean(present), statistics.stdev(present)


def interpolate(rows: Sequence[dict], x_key: str, x: float,
                keys: Iterable[str]) -> dict[str, float]:
  """Each of `keys` linearly interpolated at `x` along `x_key`, over the rows that have both.

  A key is left out when no row at or below `x` has it, or none at or above (no extrapolation).
  """
  out = {}
  for key in keys:
    points = sorted((number(r, x_key), number(r, key)) for r in rows
                    if number(r, x_key) is not None and number(r, key) is not None)
    below = [p for p in points if p[0] <= x]
    above = [p for p in points if p[0] >= x]
    if not below or not above:
      continue
    (x0, y0), (x1, y1) = below[-1], above[0]
    out[key] = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
  return out


def metric_keys(runs: Iterable[Run]) -> list[str]:
  """The `eval/<objective>_{loss,accuracy,perplexity}` keys logged by any run, objectives in
  jaxlm's order (mlm, nsp, plm, clm, then others by name)."""
  found = {(m.group(1), m.group(2)) for run in runs for row in run.rows for key in row
           if (m := _EVAL_KEY.match(key))}

  def order(item):
    objective, suffix = item
    known = _OBJECTIVE_ORDER.index(objective) if objective in _OBJECTIVE_ORDER else len(
        _OBJECTIVE_ORDER)
    return known, objective, _SUFFIX_ORDER.index(suffix)

  return [f"eval/{o}_{s}" for o, s in sorted(found, key=order)]


def _eval_rows(run: Run) -> list[dict]:
  return [r for r in run.rows if "eval/loss" in r]


def final_values(run: Run, keys: Sequence[str]) -> dict[str, float | None]:
  """A finished run's eval metrics at its final step and what it cost."""
  last = next(r for r in run.rows if r["step"] == run.final_step)
  tokens = number(last, "tokens_seen")
  if tokens is None and run.tokens_per_step is not None:
    tokens = float(run.final_step * run.tokens_per_step)
  speeds = [number(r, "tokens_per_sec") for r in run.rows if "tokens_per_sec" in r]
  speeds = speeds[1:] or speeds  # The first row includes compilation.
  return {**{k: number(last, k) for k in keys},
          "tokens_seen": tokens,
          "model_flops": number(last, "model_flops"),
          "tokens_per_sec": mean_std(speeds)[0],
          "wall_seconds": run.wall_seconds}


@dataclasses.dataclass
class Point:
  """The runs (seeds) of one sweep point and their combined figures."""

  name: str
  runs: list[Run]
  final: dict[str, tuple[float | None, float | None]]  # key -> (mean, std), finished runs.
  at_budget: dict[str, tuple[float | None, float | None]] = dataclasses.field(default_factory=dict)

  @property
  def finished(self) -> list[Run]:
    return [r for r in self.runs if r.finished]

  @property
  def overrides(self) -> dict | None:
    return self.runs[0].overrides

  def status(self) -> str:
    if len(self.runs) == 1:
      return self.runs[0].describe()
    done = len(self.finished)
    if done == len(self.runs):
      return f"finished ({done} seeds)"
    rest = "; ".join(f"seed {r.seed}: {r.describe()}" for r in self.runs if not r.finished)
    return f"{done}/{len(self.runs)} finished; {rest}"


def build_points(runs: Sequence[Run]) -> tuple[list[Point], list[str], tuple[str, float] | None]:
  """Points with their final figures and figures at equal compute; the metric keys; the
  budget (name of the cheapest point, its model FLOPs), None when no point has FLOPs."""
  keys = metric_keys(runs)
  by_name: dict[str, list[Run]] = collections.defaultdict(list)
  for run in runs:
    by_name[run.name].append(run)
  points = []
  for name, point_runs in by_name.items():
    finals = [final_values(r, keys) for r in point_runs if r.finished]
    columns = [*keys, *(k for k, _ in _COST_COLUMNS)]
    points.append(Point(name, point_runs, {k: mean_std(f[k] for f in finals) for k in columns}))
  costs = [(p.final["model_flops"][0], p.name) for p in points
           if p.final["model_flops"][0] is not None]
  if not costs:
    return points, keys, None
  flops, cheapest = min(costs)
  for point in points:
    # The step from every row (train rows log FLOPs too), the metrics from the eval rows.
    values = [{**interpolate(r.rows, "model_flops", flops, ["step"]),
               **interpolate(_eval_rows(r), "model_flops", flops, keys)} for r in point.finished]
    point.at_budget = {k: mean_std(v.get(k) for v in values) for k in ["step", *keys]}
  return points, keys, (cheapest, flops)


def format_value(value: float | None) -> str:
  """How the Markdown and stdout tables print a number: 4 significant digits, scientific
  notation for large or tiny magnitudes."""
  if value is None:
    return ""
  if value == 0:
    return "0"
  if not math.isfinite(value):
    return str(value)
  if abs(value) >= 1e5 or abs(value) < 1e-3:
    return f"{value:.3e}"
  return f"{value:.4g}"


def format_mean_std(mean: float | None, std: float | None) -> str:
  if mean is None:
    return ""
  return format_value(mean) if std is None else f"{format_value(mean)} ± {format_value(std)}"


def format_overrides(overrides: dict | None) -> str:
  if overrides is None:
    return "?"
  return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(none)"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

  return [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]


def markdown(points: Sequence[Point], keys: Sequence[str], budget, title: str) -> str:
  """summary.md: final metrics and cost per point, then the same metrics at equal compute."""
  header = ["point", "status", "overrides", *keys, *(h for _, h in _COST_COLUMNS)]
  rows = []
  for p in points:
    cost = [format_value(p.final[k][0]) if k in _SPREAD_HIDDEN else format_mean_std(*p.final[k])
            for k, _ in _COST_COLUMNS]
    rows.append([p.name, p.status(), format_overrides(p.overrides),
                 *(format_mean_std(*p.final[k]) for k in keys), *cost])
  lines = [
      f"# Sweep summary: {title}", "",
      ("Final eval metrics per point on the fixed eval set (mean ± sample std over seeds when "
       "there are several). Tokens seen and model FLOPs are cumulative at the last step; "
       "tokens/s is the mean of the training rows after the first (which includes "
       "compilation); wall s is the trainer's wall time, all restarts together. Only finished "
       "runs count."), "",
      *_markdown_table(header, rows), "", "## At equal compute", ""]
  if budget is None:
    lines.append("No finished run logged `model_flops`: nothing to compare at equal compute.")
    return "\n".join(lines) + "\n"
  cheapest, flops = budget
  lines += [
      (f"Eval metrics interpolated linearly at {format_value(flops)} model FLOPs, what the "
       f"cheapest point (`{cheapest}`) spent in all (x = cumulative model FLOPs at each eval "
       "row). `step` is where each point reaches that budget. Empty: no eval row at or below "
       "the budget (no extrapolation)."), "",
      *_markdown_table(["point", "step", *keys],
                       [[p.name, *(format_mean_std(*p.at_budget.get(k, (None, None)))
                                   for k in ["step", *keys])] for p in points])]
  return "\n".join(lines) + "\n"


def write_csv(points: Sequence[Point], keys: Sequence[str], path: str) -> None:
  """summary.csv: the rows of the first table, full precision, a mean and a std column each."""
  columns = [*keys, *(k for k, _ in _COST_COLUMNS)]
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["point", "status", "finished_runs", "overrides",
                     *(f"{k}_{stat}" for k in columns for stat in ("mean", "std"))])
    for p in points:
      cells = []
      for k in columns:
        cells += ["" if v is None else repr(v) for v in p.final[k]]
      writer.writerow([p.name, p.status(), len(p.finished),
                       "" if p.overrides is None else json.dumps(p.overrides), *cells])


def plot(points: Sequence[Point], path: str) -> None:
  """summary.png: eval/loss against steps and against model FLOPs, one line per point (the
  mean over its seeds), the seeds' min-max as a band. Unfinished runs are drawn as far as they
  got, on the steps all their seeds reached."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  figure = Figure(figsize=(12, 4.5), layout="constrained")
  FigureCanvasAgg(figure)
  by_step, by_flops = figure.subplots(1, 2)
  for p in points:
    series = [s for s in ({r["step"]: r for r in _eval_rows(run)} for run in p.runs) if s]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
      continue
    losses = [[number(s[step], "eval/loss") for s in series] for step in steps]
    mean = [statistics.fmean(v) for v in losses]
    flops = [number(series[0][step], "model_flops") for step in steps]
    for axes, xs in ((by_step, steps), (by_flops, flops)):
      if any(x is None for x in xs):
        continue  # No model_flops in these rows.
      (line,) = axes.plot(xs, mean, marker="o", markersize=3, label=p.name)
      if len(series) > 1:
        axes.fill_between(xs, [min(v) for v in losses], [max(v) for v in losses],
                          color=line.get_color(), alpha=0.2, linewidth=0)
  by_step.set(xlabel="step", ylabel="eval/loss (weighted sum of the objectives)",
              title="eval loss against steps")
  by_flops.set(xlabel="model FLOPs (cumulative)", ylabel="eval/loss",
               title="eval loss against compute")
  for axes in (by_step, by_flops):
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
      axes.legend(fontsize="small")
  figure.savefig(path, dpi=100)


def text_table(points: Sequence[Point], keys: Sequence[str]) -> str:
  """The short table printed at the end of a sweep: status, eval losses, speed, wall time."""
  losses = [k for k in keys if k.endswith("_loss")]
  header = ["point", "status", *losses, "tokens/s", "wall s"]
  rows = [[p.name, p.status(), *(format_mean_std(*p.final[k]) for k in losses),
           format_value(p.final["tokens_per_sec"][0]), format_value(p.final["wall_seconds"][0])]
          for p in points]
  widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
  return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip()
                   for line in [header, *rows])


def summarize(sweep_dir: str) -> str | None:
  """Writes summary.md, summary.csv and summary.png into `sweep_dir`; returns the short text
  table, or None when the folder holds no run."""
  runs = find_runs(sweep_dir)
  if not runs:
    return None
  points, keys, budget = build_points(runs)
  title = os.path.basename(os.path.abspath(sweep_dir))
  with open(os.path.join(sweep_dir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(markdown(points, keys, budget, title))
  write_csv(points, keys, os.path.join(sweep_dir, "summary.csv"))
  plot(points, os.path.join(sweep_dir, "summary.png"))
  return text_table(points, keys)
