"""Stopping cleanly when the job is told to stop (SIGTERM from a scheduler, Ctrl-C).

One process: a signal handler sets a flag; the loop checks it after every step, saves a
checkpoint at that step and exits 0. Several processes: JAX's preemption notifier catches
SIGTERM and orbax's sync point (`reached_preemption`) makes every host stop at the same step, so
all save the same checkpoint.
"""

import signal
import threading
from collections.abc import Callable

from absl import logging


class StopRequest:
  def __init__(self, reached_sync_point: Callable[[int], bool], multi_process: bool):
    self._flag = threading.Event()
    self._reached_sync_point = reached_sync_point
    self._multi_process = multi_process
    self._previous = {}
    handled = (signal.SIGINT,) if multi_process else (signal.SIGTERM, signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
      for sig in handled:
        self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    if self._multi_process and not self._flag.is_set():
      # Hand Ctrl-C to JAX's preemption notifier (it owns SIGTERM), so every host gets the same
      # sync point instead of each stopping at the step its own signal arrived.
      self._flag.set()
      logging.warning("Got SIGINT: all processes will save a checkpoint at the same step.")
      signal.raise_signal(signal.SIGTERM)
      return
    if self._flag.is_set():  # A second signal: stop now, the old way.
      self.restore()
      signal.raise_signal(signum)
      return
    logging.warning("Got %s: saving a checkpoint at the end of this step, then exiting.",
                    signal.Signals(signum).name)
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """True once a stop was requested (on every host at the same `step`)."""
    if self._multi_process:
      try:
        return self._reached_sync_point(step)
      except Exception:  # No preemption service (e.g. not started by jax.distributed).
        return self._flag.is_set()
    return self._flag.is_set()

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
