"""`train.profile_steps`: a `jax.profiler` trace of a few training steps, in the workdir.

The trace starts just before the first step of the range is dispatched and stops once the last
one has finished (its outputs are waited for: dispatch is asynchronous, and a trace stopped
at dispatch would miss the step's device work). Open `<workdir>/profile` with TensorBoard's
profile plugin, or the `.xplane.pb` / `.trace.json.gz` under `plugins/profile/<run>/` with
Perfetto or XProf.
"""

import os
from typing import Any

import jax
from absl import logging

PROFILE_DIR = "profile"


def profile_dir(workdir: str, process_index: int, process_count: int) -> str:
  """`<workdir>/profile`; with several processes each writes its own `process_<i>` below it
  (processes on one host would otherwise share a host name and a run folder)."""
  base = os.path.join(workdir, PROFILE_DIR)
  return base if process_count == 1 else os.path.join(base, f"process_{process_index}")


class StepProfiler:
  """Starts and stops the trace around steps `first..last` (1-based, as logged) of a run that
  starts after step `start`; a run resumed past `first` traces from its first step, one resumed
  past `last` traces nothing."""

  def __init__(self, steps: tuple[int, int] | None, start: int, directory: str):
    self.directory = directory
    self.first = self.last = None
    if steps is not None and start < steps[1]:
      self.first, self.last = max(steps[0], start + 1), steps[1]
    self.active = False

  def before(self, done: int) -> None:
    """Called before step `done` (1-based) is dispatched."""
    if done == self.first:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True
      logging.info("Profiling steps %d..%d into %s", self.first, self.last, self.directory)

  def after(self, done: int, outputs: Any) -> None:
    """Called once step `done` is dispatched, with what it returned."""
    if self.active and done == self.last:
      jax.block_until_ready(outputs)
      self.stop()
      logging.info("Profile of steps %d..%d written to %s", self.first, self.last,
                   self.directory)

  def stop(self) -> None:
    """Ends a trace still open (a run stopped inside the range); safe to call at any time."""
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
