"""The global batch of each step under a batch-size ramp, and the example its rows start at.

A ramp (`train.batch_ramp_steps` R > 0, `train.batch_ramp_start` b0) splits the first R steps
into n = data.batch_size / b0 stages of near-equal length (stage k covers steps
[k R // n, (k + 1) R // n)), stage k at global batch (k + 1) x b0: the last stage already runs
at the full batch, which stays to the end. Every size is a multiple of b0, so one check of b0
against the processes, the data-parallel shards and the micro-batches covers all of them, and
the step compiles once per stage (n times).

Step s takes examples offset(s) .. offset(s) + size(s) - 1, offset(s) being the rows of every
step before it. Both are closed forms over the n stages, never a loop over steps, so the loader
finds any step's examples at once: batches stay a pure function of the step, and a run resumed
mid-ramp sees the batches it would have seen.
"""

import dataclasses

import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchSchedule:
  """Global batch sizes by step; `ramp_steps` 0 is the constant `batch_size` (no ramp)."""

  batch_size: int  # The full global batch (data.batch_size), from the ramp's end on.
  ramp_start: int  # The first stage's global batch; divides batch_size.
  ramp_steps: int  # Steps of the ramp; 0 = none.

  def __post_init__(self):
    # Programming errors only: `jaxlm.config.validate` words the user's mistakes.
    if self.ramp_steps < 0 or self.batch_size <= 0:
      raise ValueError(f"bad schedule {self}")
    if self.ramp_steps and (self.ramp_start <= 0 or self.batch_size % self.ramp_start
                            or self.ramp_steps < self.batch_size // self.ramp_start):
      raise ValueError(f"bad ramp {self}: ramp_start must divide batch_size, and every stage "
                       "needs a step")

  @property
  def stages(self) -> int:
    """Stages of the ramp (0 without one)."""
    return self.batch_size // self.ramp_start if self.ramp_steps else 0

  def _stage_starts(self) -> np.ndarray:
    """First step of each stage, then the ramp's end: n + 1 numbers."""
    n = self.stages
    return np.arange(n + 1, dtype=np.int64) * self.ramp_steps // n

  def _stage_sizes(self) -> np.ndarray:
    return (np.arange(self.stages, dtype=np.int64) + 1) * self.ramp_start

  def _rows_before_stages(self) -> np.ndarray:
    """Global rows of all steps before each stage's first step (and before the ramp's end)."""
    return np.concatenate([[0], np.cumsum(np.diff(self._stage_starts()) * self._stage_sizes())])

  def _stage(self, step: int) -> int:
    return int(np.searchsorted(self._stage_starts(), step, side="right")) - 1

  def size(self, step: int) -> int:
    """The global batch of `step` (counted from 0, as the loader's)."""
    if step >= self.ramp_steps:
      return self.batch_size
    return int(self._stage_sizes()[self._stage(step)])

  def offset(self, step: int) -> int:
    """Global rows of the steps before `step`: the example number of `step`'s first row."""
    if step < 0:
      raise ValueError(f"step {step} < 0")
    if not self.ramp_steps:
      return step * self.batch_size
    if step >= self.ramp_steps:
      return int(self._rows_before_stages()[-1]) + (step - self.ramp_steps) * self.batch_size
    k = self._stage(step)
    return int(self._rows_before_stages()[k] + (step - self._stage_starts()[k])
               * self._stage_sizes()[k])

  def sizes(self) -> list[int]:
    """Every global batch the run may use, smallest first (one compiled step each)."""
    return [int(s) for s in self._stage_sizes()] if self.ramp_steps else [self.batch_size]

  def rows_by_size(self, step: int) -> dict[int, int]:
    """Global rows of the steps before `step`, by their batch size: for model FLOPs whose
    per-step part (relative attention's offsets) is shared by a step's rows."""
    rows: dict[int, int] = {}
    starts, sizes = self._stage_starts(), self._stage_sizes()
    for k in range(self.stages):
      steps = min(step, int(starts[k + 1])) - int(starts[k])
      if steps > 0:
        rows[int(sizes[k])] = rows.get(int(sizes[k]), 0) + steps * int(sizes[k])
    after = step - self.ramp_steps
    if after > 0:
      rows[self.batch_size] = rows.get(self.batch_size, 0) + after * self.batch_size
    return rows

  def to_json(self) -> dict:
    """What a checkpoint's position records, to tell a resumed run that the stream moved."""
    return {"batch_size": self.batch_size, "ramp_start": self.ramp_start,
            "ramp_steps": self.ramp_steps}


def from_config(config: ml_collections.ConfigDict) -> BatchSchedule | None:
  """The ramp `config.train` asks for; None when off (the loader's constant batches).

  A run folder's `config.json` from before the ramp existed has no `batch_ramp_steps`: its run
  had none, so that reads as off too.
  """
  t = config.train
  if "batch_ramp_steps" not in t or t.batch_ramp_steps == 0:
    return None
  return BatchSchedule(config.data.batch_size, t.batch_ramp_start, t.batch_ramp_steps)
