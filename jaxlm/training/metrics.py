"""Writing metrics: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events.

On resume the file is cut back to the restored step, so a step is never written twice and a
line cut by a kill is dropped. Only process 0 writes.
"""

import json
import math
import os
from collections.abc import Mapping

import numpy as np
from tensorboardX import SummaryWriter

from jaxlm.analysis.runs import read_metrics  # noqa: F401  (where readers find it too)


def _rows_up_to(path: str, last_step: int) -> list[str]:
  keep = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # A line cut by a kill.
        continue
      if row.get("step", math.inf) <= last_step:
        keep.append(json.dumps(row))
  return keep


class MetricWriter:
  def __init__(self, workdir: str, *, resume_step: int, enabled: bool = True):
    self._enabled = enabled
    if not enabled:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path := self.path):
      rows = _rows_up_to(path, resume_step)
      tmp = path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(r + "\n" for r in rows)
      os.replace(tmp, path)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    row = {"step": int(step)}
    row.update({k: _plain(v) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    for key, value in row.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self._file.close()
      self._tb.close()


def _plain(value):
  value = np.asarray(value).item() if not isinstance(value, (int, float, str)) else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible as strings.
  return value


