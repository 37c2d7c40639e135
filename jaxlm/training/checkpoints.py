"""Orbax checkpoints of the train state and the data position, saved in the background.

Resume order (see `loop.train_and_evaluate`): the newest good checkpoint in the workdir, else a
fresh start. Restores always name their target (abstract arrays with shardings and dtypes), so a
checkpoint restores onto any mesh. A newest checkpoint that fails to restore (cut or corrupt
files) is reported and the previous one is used.
"""

import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from jaxlm.errors import UserError


class Checkpointer:
  def __init__(self, directory: str, *, keep: int):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=True,
        # A save cut by SIGKILL leaves `<step>.orbax-checkpoint-tmp`: removed at start.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
        },
    )

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_position: dict[str, Any]) -> float:
    """Starts an asynchronous save; returns the seconds the caller was blocked.

    The arrays are copied off the devices before this returns; writing happens in the
    background. An error of an earlier background save is raised here.
    """
    started = time.perf_counter()
    self._manager.check_for_errors()
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
        ),
        force=True,
    )
    return time.perf_counter() - started

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def restore_newest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that restores, as `(state, data_position)`; None if there is none."""
    steps = self.steps()
    unrestorable = []
    for step in reversed(steps):
      _check_matches(self._manager, step, abstract_state)
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
      except Exception as e:  # orbax raises ValueError, OSError or a bare Exception for cut data.
        logging.warning("Checkpoint at step %d does not restore (%s); trying an older one.", step,
                        str(e).splitlines()[0][:300])
        unrestorable.append(step)
        continue
      self._set_aside(unrestorable)
      return restored.state, restored.data
    if steps:
      raise UserError(
          f"None of the checkpoints {steps} in {self._manager.directory} restores. Move the "
          "checkpoints/ folder away to start afresh."
      )
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unrestorable checkpoints out of the way (kept, not deleted), so their steps can be
    saved again."""
    if not steps:
      return
    if jax.process_index() == 0:
      directory = os.fspath(self._manager.directory)
      aside = os.path.join(os.path.dirname(directory), "unrestorable_checkpoints")
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{int(time.time())}")
        os.replace(os.path.join(directory, str(step)), target)
        logging.warning("Moved the unrestorable checkpoint of step %d to %s", step, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("unrestorable checkpoints moved")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until background saves are done; an error there is raised here."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _check_matches(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> None:
  """A checkpoint whose arrays differ in shape or dtype from the target is an error.

  orbax would cast a dtype silently; a shape change means another model. Both are refused with
  the name of the first differing array.
  """
  try:
    saved = manager.item_metadata(step)["state"]
  except Exception:  # Unreadable metadata: the restore itself will report and fall back.
    return
  if saved is None:
    return
  saved_leaves = {_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  for path, want in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
    got = saved_leaves.get(_names(path))
    if got is None or not hasattr(got, "dtype"):
      continue
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
      raise UserError(
          f"The checkpoint at step {step} in {manager.directory} holds "
          f"{jax.tree_util.keystr(path)} as {got.dtype}{list(got.shape)}, but this config "
          f"makes it {want.dtype}{list(want.shape)}. A workdir resumes only the model it "
          "was started with (same sizes and model.param_dtype): restore those settings or "
          "use a new --workdir."
      )


def _names(path) -> tuple[str, ...]:
  """A tree path as plain strings, so dict, attribute and index keys compare equal."""
  return tuple(
      str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
  )
