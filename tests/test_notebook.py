"""notebooks/quickstart.ipynb, executed cell by cell in a Jupyter kernel as Colab runs it, on CPU
with a few steps: it runs without an error, and its run, plot, fill-mask result and sweep summary
are there. Also that the committed file is a valid notebook with its outputs cleared.

The kernel is this interpreter (a kernelspec written for the test, found first through
JUPYTER_PATH), so the test does not depend on which `python3` kernels the machine has. It
inherits the environment, 8 simulated devices included (the batch of 16 divides by them), and
the notebook's training processes inherit it from the kernel, with a persistent JAX compilation
cache for this test: the two sweep points compile the same steps (their masking differs on the
host only), so the second one loads them (about 8 s of the test's 60-90 s on 2 CPU cores).
"""

import csv
import json
import os
import re
import sys
from unittest import mock

import nbformat
import pytest
from nbclient import NotebookClient

from jaxlm.analysis.runs import read_metrics

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks",
                        "quickstart.ipynb")
KERNEL = "jaxlm-test-python"
CELL_TIMEOUT_S = 300
STEPS = 4
SWEEP_STEPS = 2
SETTINGS = {"JAXLM_NOTEBOOK_STEPS": str(STEPS), "JAXLM_NOTEBOOK_SWEEP_STEPS": str(SWEEP_STEPS),
            "JAXLM_NOTEBOOK_BATCH_SIZE": "16", "JAXLM_NOTEBOOK_EVAL_EXAMPLES": "16"}
SWEEP_POINTS = ["rate_15", "always_mask"]

# Appended to the executed copy only: what the notebook's variables hold, as one JSON line.
PROBE = """
import json
print("PROBE " + json.dumps({"backend": BACKEND, "run": os.path.abspath(RUN),
                             "sweep": os.path.abspath(SWEEP), "predictions": predictions}))
"""


def outputs(cell):
  return cell.get("outputs", [])


def stream_text(cell) -> str:
  return "".join(o.get("text", "") for o in outputs(cell) if o["output_type"] == "stream")


@pytest.fixture(scope="module")
def executed(tmp_path_factory, repo_root):
  """The executed notebook, its probe's JSON and its work folder."""
  tmp = tmp_path_factory.mktemp("notebook")
  kernel_dir = tmp / "jupyter" / "kernels" / KERNEL
  kernel_dir.mkdir(parents=True)
  (kernel_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "jaxlm test", "language": "python"}))
  workdir = tmp / "runs"
  env = {**os.environ, **SETTINGS, "JAXLM_NOTEBOOK_WORKDIR": str(workdir),
         "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"), "IPYTHONDIR": str(tmp / "ipython")}
  env.pop("MPLBACKEND", None)  # The kernel's inline backend makes the figures outputs.
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  notebook.cells.append(nbformat.v4.new_code_cell(PROBE, id="test-probe"))
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                          resources={"metadata": {"path": repo_root}})
  jupyter = {"JUPYTER_PATH": str(tmp / "jupyter"), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")}
  with mock.patch.dict(os.environ, jupyter):
    client.execute(env=env)  # Raises CellExecutionError, with the cell's traceback, on an error.
  line = next(line for line in stream_text(notebook.cells[-1]).splitlines()
              if line.startswith("PROBE "))
  return notebook, json.loads(line[len("PROBE "):]), workdir


def cell(notebook, cell_id):
  return next(c for c in notebook.cells if c.get("id") == cell_id)


def test_committed_notebook_is_valid_and_cleared():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  assert notebook.nbformat == 4
  assert notebook.metadata.kernelspec.name == "python3"
  code = [c for c in notebook.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert "JAXLM_SOURCE = " in cell(notebook, "install").source


def test_runs_on_cpu_in_the_work_folder(executed):
  notebook, probe, workdir = executed
  assert probe["backend"] == "cpu"
  assert probe["run"].startswith(str(workdir)) and probe["sweep"].startswith(str(workdir))
  assert re.search(r"JAX finds \d+ CPU device\(s\)", stream_text(cell(notebook, "backend")))


def test_the_training_run_logged_its_rows(executed):
  _, probe, _ = executed
  rows = read_metrics(os.path.join(probe["run"], "metrics.jsonl"))
  assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
  assert STEPS in [r["step"] for r in rows if "eval/mlm_accuracy" in r]
  assert os.path.isdir(os.path.join(probe["run"], "checkpoints", str(STEPS)))


def test_the_curves_are_a_figure(executed):
  notebook, _, _ = executed
  curves = outputs(cell(notebook, "curves"))
  assert any("image/png" in o.get("data", {}) for o in curves)
  assert f"step {STEPS}: eval MLM loss" in stream_text(cell(notebook, "curves"))


def test_fill_mask_gives_the_top_pieces_at_each_mask(executed):
  notebook, probe, _ = executed
  predictions = probe["predictions"]
  assert [p["text"] for p in predictions] == ["The [MASK] of the hacker.",
                                              "A hacker wrote the [MASK] ."]
  for item in predictions:
    (mask,) = item["predictions"]
    assert item["input_ids"][mask["position"]] == 4  # [MASK]
    top = mask["top"]
    assert len(top) == 5 and set(top[0]) == {"token", "id", "logit", "prob"}
    probs = [t["prob"] for t in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
  printed = stream_text(cell(notebook, "fill"))
  assert "The [MASK] of the hacker.\n  [MASK] #1 (position " in printed
  assert outputs(cell(notebook, "fill"))[-1]["output_type"] == "execute_result"


def test_the_sweep_summary_has_both_points(executed):
  notebook, probe, _ = executed
  with open(os.path.join(probe["sweep"], "summary.csv"), encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert [r["point"] for r in table] == SWEEP_POINTS
  assert all(r["status"] == "finished" and float(r["eval/mlm_loss_mean"]) > 0 for r in table)
  shown = outputs(cell(notebook, "summary"))
  markdown = next(o["data"]["text/markdown"] for o in shown if "text/markdown" in o.get("data", {}))
  assert all(f"| {point} | finished" in markdown for point in SWEEP_POINTS)
  assert any("image/png" in o.get("data", {}) for o in shown)
