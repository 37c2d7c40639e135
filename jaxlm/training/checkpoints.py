"""Orbax checkpoints of the train state and the data position, saved in the background.

Resume order (see `loop.train_and_evaluate`): the newest good checkpoint in the workdir, else a
fresh start. Restores always name their target (abstract arrays with shardings and dtypes), so a
checkpoint restores onto any mesh.

Falling back to an older checkpoint rewinds the run, so it happens only on evidence that the
newest is damaged (cut or corrupt files: a JSON or decompression error, a missing file, or
tensorstore's DATA_LOSS / OUT_OF_RANGE / NOT_FOUND). Any other failure (a permission, timeout or
connection error, an unknown one) is retried a few times and then stops the run, leaving every
checkpoint in place. With several processes, all agree on each outcome before acting: one
process's damaged read sends every process to the older step, one's unexplained failure stops
them all, so no two processes ever resume from different steps.
"""

import json
import os
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxlm.errors import UserError

# tensorstore reports cut or missing data with these status codes (the message's first word).
_DAMAGE_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND")
_RESTORE_ATTEMPTS = 3
_RETRY_SECONDS = 2.0
# A restore's outcome, the same number on every process once they agree (the largest wins).
_RESTORED, _DAMAGED, _FAILED = 0, 1, 2


def is_damage(error: BaseException) -> bool:
  """Whether a restore error shows the checkpoint's files are cut or corrupt (not merely that
  reading them failed this time)."""
  if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, zlib.error, EOFError,
                        FileNotFoundError)):
    return True
  if isinstance(error, OSError):  # Permission, timeout, connection, I/O: the storage, not the data.
    return False
  code = str(error).split(":", 1)[0].strip()
  return isinstance(error, ValueError) and code in _DAMAGE_CODES


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
    """The newest checkpoint that restores, as `(state, data_position)`; None if there is none.

    Older checkpoints are tried only past damaged ones; see the module docstring.
    """
    steps = self.steps()
    unrestorable = []
    for step in reversed(steps):
      _check_matches(self._manager, step, abstract_state)
      for attempt in range(_RESTORE_ATTEMPTS):  # Every process retries together.
        outcome, restored, error = self._try_restore(step, abstract_state)
        outcome = _agreed(outcome)
        if outcome != _FAILED:
          break
        logging.warning("Reading the checkpoint at step %d failed (%s); attempt %d of %d.", step,
                        _first_line(error) if error is not None else "on another process",
                        attempt + 1, _RESTORE_ATTEMPTS)
        if attempt + 1 < _RESTORE_ATTEMPTS:
          time.sleep(_RETRY_SECONDS * (attempt + 1))
      if outcome == _RESTORED:
        self._set_aside(unrestorable)
        return restored.state, restored.data
      if outcome == _FAILED:
        where = (f"({_first_line(error)})" if error is not None else
                 "on another process (see its log)")
        raise UserError(
            f"The checkpoint at step {step} in {self._manager.directory} could not be read "
            f"{where}, and nothing shows it is damaged, so the run does not fall back to an "
            "older one (that would rewind it). Fix the storage or permissions and run the same "
            "command again; every checkpoint was left in place.")
      logging.warning("Checkpoint at step %d is damaged (%s); trying an older one.", step,
                      _first_line(error) if error is not None else "on another process")
      unrestorable.append(step)
    if steps:
      raise UserError(
          f"None of the checkpoints {steps} in {self._manager.directory} restores. Move the "
          "checkpoints/ folder away to start afresh."
      )
    return None

  def _try_restore(self, step: int, abstract_state: Any):
    """`(outcome, restored or None, error or None)` of one attempt on this process."""
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
      )
      return _RESTORED, restored, None
    except Exception as e:  # orbax raises ValueError, OSError or a bare Exception.
      return (_DAMAGED if is_damage(e) else _FAILED), None, e

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


def restore_params(directory: str, abstract_params: Any, step: int | None = None
                   ) -> tuple[Any, int]:
  """The parameters alone of the checkpoint at `step` (default: the newest), as `(params, step)`.

  Reads nothing of the optimizer state (a partial restore), so evaluation, prediction, export and
  fine-tuning need only the memory of the parameters, on any mesh `abstract_params` names.
  """
  if not os.path.isdir(directory):
    raise UserError(f"There is no checkpoints folder at {directory}: --workdir must be the "
                    "folder of a jaxlm training run that saved at least one checkpoint.")
  manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps())
  if not steps:
    raise UserError(f"{directory} holds no finished checkpoint yet: train longer (past "
                    "train.checkpoint_every) or wait for the run's first save.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise UserError(f"No checkpoint of step {step} in {directory}; it holds steps {steps}.")
  _check_matches(manager, step, {"params": abstract_params})
  restore_args = jax.tree_util.tree_map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract_params)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args},
        partial_restore=True)))
  except Exception as e:  # orbax raises ValueError, OSError or a bare Exception.
    raise UserError(f"The checkpoint at step {step} in {directory} could not be read "
                    f"({_first_line(e)}). Choose another with --step (it holds {steps}).") from None
  finally:
    manager.close()
  return restored.state["params"], step


def _agreed(outcome: int) -> int:
  """The worst outcome over all processes (each process calls this with its own)."""
  if jax.process_count() == 1:
    return outcome
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def _first_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


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
