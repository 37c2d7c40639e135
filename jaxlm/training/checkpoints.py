"""Orbax checkpoints of the train state and the data position, saved in the background.

Resume order (see `loop.train_and_evaluate`): the newest good checkpoint in the workdir, else a
fresh start. Restores always name their target (abstract arrays with shardings and dtypes), so a
checkpoint restores onto any mesh. A newest checkpoint that fails to restore (cut or corrupt
files) is reported and the previous one is used.
"""

import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from jaxlm.errors import UserError


class Checkpointer:
  def __init__(self, directory: str, *, keep: int):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True
    )
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_position: dict[str, Any]) -> None:
    """Starts an asynchronous save; the arrays are copied before this returns."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)
        ),
        force=True,
    )

  def restore_newest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that restores, as `(state, data_position)`; None if there is none."""
    steps = self.steps()
    for step in reversed(steps):
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
        continue
      return restored.state, restored.data
    if steps:
      raise UserError(
          f"None of the checkpoints {steps} in {self._manager.directory} restores. Move the "
          "checkpoints/ folder away to start afresh."
      )
    return None

  def wait(self) -> None:
    """Blocks until background saves are done; an error there is raised here."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
