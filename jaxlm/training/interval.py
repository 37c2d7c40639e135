"""The metrics of the steps since the last log row, and the guard that stops a diverged run."""

import time

import jax
import numpy as np

from jaxlm.errors import UserError


class TrainingStopped(UserError):
  """The run stopped itself (non-finite values); the last good checkpoint is kept."""


class Interval:
  """Metrics of the steps since the last log row, fetched one step late.

  Its sums travel with the checkpoint (`to_json`), so the rows of a resumed run equal those of
  an uninterrupted one.
  """

  def __init__(self, saved: dict | None = None):
    self.reset()
    if saved:
      self.sums, self.steps = dict(saved["sums"]), saved["steps"]
      self.skipped, self.last = saved["skipped"], dict(saved["last"])

  def reset(self):
    self.sums: dict[str, float] = {}
    self.steps = 0
    self.skipped = 0
    self.last: dict[str, float] = {}
    self.timed_steps = 0  # Steps run in this process since `started` (for tokens/s).
    self.started = time.perf_counter()

  def to_json(self) -> dict:
    return {"sums": self.sums, "steps": self.steps, "skipped": self.skipped, "last": self.last}

  def add(self, metrics: dict[str, np.ndarray]) -> None:
    self.steps += 1
    self.timed_steps += 1
    self.skipped += int(metrics["skipped"])
    for key, value in metrics.items():
      value = float(value)
      if "/" in key:
        self.sums[key] = self.sums.get(key, 0.0) + value
      else:
        self.sums[key + "/sum"] = self.sums.get(key + "/sum", 0.0) + value
        self.sums[key + "/count"] = self.sums.get(key + "/count", 0.0) + 1.0
        self.last[key] = value


def account(interval: Interval, metrics, consecutive_skips: int, t, checkpointer) -> int:
  """Adds one step's fetched metrics; stops the run after too many non-finite steps in a row
  or past `train.divergence_loss`."""
  host = jax.device_get(metrics)
  interval.add(host)
  consecutive_skips = consecutive_skips + 1 if int(host["skipped"]) else 0
  loss = float(host["loss"])
  if np.isfinite(loss) and loss > t.divergence_loss:
    steps = checkpointer.steps()
    raise TrainingStopped(
        f"Training stopped: the loss reached {loss:.4g}, past train.divergence_loss "
        f"({t.divergence_loss:g}); the run has diverged. Lower optimizer.learning_rate (or "
        f"raise optimizer.warmup_steps). The last good checkpoint "
        f"({'step ' + str(steps[-1]) if steps else 'none yet'}) is left intact."
    )
  if consecutive_skips >= t.max_consecutive_skips:
    steps = checkpointer.steps()
    raise TrainingStopped(
        f"Training stopped: the loss or gradients were non-finite (NaN/inf) for "
        f"{consecutive_skips} consecutive steps; those updates were skipped. The learning rate "
        f"(optimizer.learning_rate) is probably too high. The last good checkpoint "
        f"({'step ' + str(steps[-1]) if steps else 'none yet'}) is left intact."
    )
  return consecutive_skips
