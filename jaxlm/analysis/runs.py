"""Reading a workdir's records without any model or training code (DESIGN: `analysis/` must run
on a laptop with nothing but the files)."""

import json


def read_metrics(path: str) -> list[dict]:
  """Rows of a metrics.jsonl, the last row per step winning (as every reader should)."""
  by_step: dict[int, dict] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
  return [by_step[s] for s in sorted(by_step)]
