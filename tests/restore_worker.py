"""One process of the two-process checkpoint tests (tests/test_parallel_e2e.py), not a test.

  python tests/restore_worker.py PROCESS_ID PORT DIRECTORY save|restore [FAULT]

`save` writes checkpoints of steps 1 and 2 (a replicated array holding the step). `restore`
restores the newest that restores and prints `{"step": s, "value": v}` or `{"error": message}`;
FAULT makes this process's reads of step 2 fail after orbax's collective part: `damaged` (a
tensorstore DATA_LOSS) or `unreadable` (a PermissionError, every time).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jaxlm.errors import UserError  # noqa: E402
from jaxlm.training import checkpoints  # noqa: E402


def main(process_id: int, port: int, directory: str, mode: str, fault: str = "") -> None:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  mesh = jax.make_mesh((2,), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec())

  def state(value):
    return {"w": jax.make_array_from_callback(
        (4,), sharding, lambda index: np.full((4,), value, np.float32)[index])}

  checkpointer = checkpoints.Checkpointer(directory, keep=5)
  try:
    if mode == "save":
      for step in (1, 2):
        checkpointer.save(step, state(float(step)), {"step": step})
      checkpointer.wait()
      print(json.dumps({"saved": checkpointer.steps()}))
      return
    checkpoints._RETRY_SECONDS = 0.0
    if fault:
      real = checkpointer._manager.restore

      def restore(step, *args, **kwargs):
        restored = real(step, *args, **kwargs)  # Take part in orbax's own synchronisation.
        if step == 2:  # Then find this process's data bad, or unreadable.
          if fault == "damaged":
            raise ValueError("DATA_LOSS: injected on this process")
          raise PermissionError(13, "Permission denied (injected)")
        return restored

      checkpointer._manager.restore = restore
    abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=sharding)}
    try:
      restored, position = checkpointer.restore_newest(abstract)
      value = float(np.asarray(restored["w"].addressable_data(0))[0])
      print(json.dumps({"step": position["step"], "value": value}))
    except UserError as e:
      print(json.dumps({"error": str(e)}))
  finally:
    checkpointer.close()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:])
