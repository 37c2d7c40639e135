"""Checks on the run folder made before any work, so a run fails in seconds, not hours."""

import os
import shutil
import tempfile

import jax

from jaxlm.errors import UserError


def prepare_workdir(workdir: str) -> None:
  """Creates the workdir and proves it is writable now, not after hours of training."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-"):
      pass
  except OSError as e:
    raise UserError(f"The workdir '{workdir}' is not writable ({e.strerror}). Choose another "
                    "--workdir or fix its permissions / free disk space.") from None


def check_disk_space(workdir: str, abstract_state) -> None:
  """Refuses to start when the disk cannot hold two checkpoints of this state."""
  need = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(abstract_state))
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise UserError(
        f"The workdir '{workdir}' has {free / 2**20:.0f} MiB free, but two checkpoints of this "
        f"model need about {need / 2**20:.0f} MiB. Free space or choose another --workdir."
    )
