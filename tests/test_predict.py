"""`jaxlm.inference` and `python -m jaxlm.predict`: rows as the model reads them, predictions equal
to the model's own heads, what PLM and CLM may see, the JSONL fields and the user errors.

One run is made without training (`conftest.make_run_folder`: a tiny untrained model with MLM,
NSP, PLM and CLM heads) on the 8 simulated devices, and loaded as it is (MLM predicts, its
parameters split over fsdp x tensor), as a PLM-only run and as a CLM-only run (with their
formats). This file does not import `jaxlm.predict`, whose flags other entry points define too.
"""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import experiment_config, make_run_folder
from jaxlm.data.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID
from jaxlm.errors import UserError
from jaxlm.inference import Predictor, fill_mask as fill_mask_lib, plm_order, prediction_head
from jaxlm.training import pretrained

SEQ_LEN = 32
TEXTS = ["The hacker wrote the [MASK] in one night.",
         "A [MASK] is a person who [MASK] programs.",
         "[MASK] of the jargon file\tis a [MASK] list."]


def override(config, changes):
  """`config` with `changes` ({"a.b": value}) applied."""
  for key, value in changes.items():
    target = config
    *parents, last = key.split(".")
    for parent in parents:
      target = target[parent]
    target[last] = value
  return config


def tiny_config(**changes):
  """BERT-tiny's recipe at a tiny size."""
  config = experiment_config("bert_tiny")
  config.model.update(dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64, max_position=64,
                           vocab_size=520, initializer_range=0.2,  # More rows than pieces.
                           position_encoding="relative"))
  config.data.seq_len = SEQ_LEN
  return override(config, changes)


def only(name):
  """Overrides that enable objective `name` alone."""
  return {f"objectives.{n}.weight": float(n == name) for n in ("mlm", "nsp", "plm", "clm")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer):
  config = tiny_config(**{"objectives.plm.weight": 1.0, "objectives.clm.weight": 1.0})
  return make_run_folder(tmp_path_factory.mktemp("run"), config, tokenizer.path, step=7)


def load_as(workdir, **changes):
  """The run loaded with another config (its heads a subset of the checkpoint's)."""
  return pretrained.load(workdir, config=override(pretrained.read_config(workdir), changes))


@pytest.fixture(scope="module")
def mlm_run(workdir):
  return load_as(workdir, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})


@pytest.fixture(scope="module")
def mlm(mlm_run):
  return Predictor(mlm_run, top_k=4, batch_size=8)


@pytest.fixture(scope="module")
def plm(workdir):
  return Predictor(load_as(workdir, **only("plm"), **{"data.format": "full_sentences"}), top_k=4)


@pytest.fixture(scope="module")
def clm(workdir):
  return Predictor(load_as(workdir, **only("clm"), **{"data.format": "packed"}), top_k=4)


_APPLY = {}


def direct_logits(run, batch, head):
  """The head's full logits for one row from a plain jitted `model.apply` (compiled once per
  run, head and shapes)."""
  key = (id(run), head)
  if key not in _APPLY:
    model = run.model.clone(heads=tuple((n, h) for n, h in run.model.heads if n == head))
    _APPLY[key] = jax.jit(lambda params, batch: model.apply({"params": params}, batch,
                                                            deterministic=True)[head])
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.rules):
    logits = _APPLY[key](run.params, {k: np.asarray(v)[None] for k, v in batch.items()})
  return np.asarray(logits)[0]


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def top_logits(predictions):
  return np.array([[t["logit"] for t in p["top"]] for p in predictions])


# Rows.


def test_rows_are_the_tokenizers_encoding_with_special_pieces(mlm, clm, tokenizer):
  enc = tokenizer.encode
  row = mlm.encode("The hacker wrote the [MASK] in one night.")
  want = [CLS_ID] + enc("The hacker wrote the") + [MASK_ID] + enc("in one night.") + [SEP_ID]
  assert row.input_ids[:row.length].tolist() == want
  assert (row.input_ids[row.length:] == PAD_ID).all() and len(row.input_ids) == SEQ_LEN
  assert row.positions == (want.index(MASK_ID),)

  # A tab or a literal [SEP] starts segment B: token type 1 on pairs (BERT's layout).
  a, b = enc("A"), enc("is a")
  for text in ("A [MASK]\tis a [MASK]", "A [MASK] [SEP] is a [MASK]"):
    row = mlm.encode(text)
    ids = [CLS_ID] + a + [MASK_ID, SEP_ID] + b + [MASK_ID, SEP_ID]
    assert row.input_ids[:row.length].tolist() == ids
    assert row.token_type_ids[:row.length].tolist() == [0] * (len(a) + 3) + [1] * (len(b) + 2)
    assert [ids[p] for p in row.positions] == [MASK_ID, MASK_ID]

  # CLM on packed windows: the [SEP] that precedes a document, no closing [SEP]; it predicts at
  # the last piece.
  row = clm.encode("The hacker wrote")
  assert row.input_ids[:row.length].tolist() == [SEP_ID] + enc("The hacker wrote")
  assert row.positions == (row.length - 1,)


def test_prediction_head_prefers_mlm():
  assert prediction_head(["plm", "mlm", "nsp"]) == "mlm"
  assert prediction_head(["nsp", "plm"]) == "plm"
  assert prediction_head(["clm"]) == "clm"
  with pytest.raises(UserError, match="none of which predicts"):
    prediction_head(["nsp"])


# MLM.


def test_mlm_predictions_are_the_heads_logits_at_the_masks(mlm, mlm_run):
  assert mlm.head == "mlm" and {o.name for o in mlm_run.objectives} == {"mlm", "nsp", "plm", "clm"}
  assert dict(mlm_run.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2} and mlm_run.step == 7
  results = mlm(TEXTS)
  assert [r["text"] for r in results] == TEXTS
  for result in results:
    row = mlm.encode(result["text"])
    assert result["input_ids"] == row.input_ids[:row.length].tolist()
    assert [p["position"] for p in result["predictions"]] == list(row.positions)
    positions = np.array((row.positions * 2)[:2], np.int32)  # One shape: one compile.
    logits = direct_logits(mlm_run, {"input_ids": row.input_ids,
                                     "token_type_ids": row.token_type_ids,
                                     "mlm_positions": positions}, "mlm")
    assert logits.shape[-1] == 520
    for prediction, full in zip(result["predictions"], logits):
      assert result["input_ids"][prediction["position"]] == MASK_ID
      pieces = full[:512]  # The tokenizer's pieces; the model's extra rows are no piece.
      top = prediction["top"]
      assert len(top) == 4
      assert [t["id"] for t in top] == np.argsort(-pieces)[:4].tolist()
      np.testing.assert_allclose([t["logit"] for t in top], np.sort(pieces)[::-1][:4],
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose([t["prob"] for t in top], np.sort(softmax(pieces))[::-1][:4],
                                 rtol=1e-5)
      assert [t["token"] for t in top] == [mlm.tokenizer.id_to_piece(t["id"]) for t in top]
      assert all(x["prob"] >= y["prob"] for x, y in zip(top, top[1:]))


def test_batches_give_what_single_texts_give(mlm):
  texts = TEXTS * 4  # 12 texts: two batches of 8, the second padded.
  together = mlm(texts)
  alone = [mlm([t])[0] for t in TEXTS]
  for i, result in enumerate(together):
    np.testing.assert_allclose(top_logits(result["predictions"]),
                               top_logits(alone[i % 3]["predictions"]), rtol=1e-5, atol=1e-5)


# PLM.


def test_plm_mask_never_sees_its_own_content(plm):
  row = plm.encode("The hacker wrote the [MASK] in one [MASK].")
  first, second = row.positions
  base = top_logits(plm.predict_rows([row])[0])
  # Any content at the masks: the same predictions (each mask is hidden from every stream).
  for content in (7, 100):
    ids = row.input_ids.copy()
    ids[[first, second]] = content
    other = plm.predict_rows([dataclasses.replace(row, input_ids=ids)])[0]
    np.testing.assert_allclose(top_logits(other), base, rtol=1e-6, atol=1e-6)
  # Other context: other predictions.
  ids = row.input_ids.copy()
  ids[1:first] = 100
  assert not np.allclose(top_logits(plm.predict_rows([dataclasses.replace(row, input_ids=ids)])[0]),
                         base, atol=1e-4)


def test_plm_order_and_the_query_stream_structure(plm):
  """With the masks' content left visible, a target's own content still never reaches its
  query stream; later targets see earlier ones (why predict hides them)."""
  run = plm.pretrained
  row = plm.encode("The hacker wrote the [MASK] in one [MASK].")
  first, second = row.positions
  perm, weights = plm_order(row.input_ids, row.positions, plm.num_slots)
  assert sorted(perm.tolist()) == list(range(SEQ_LEN))
  assert perm[-2:].tolist() == [first, second] and weights.tolist() == [0, 0, 0, 1, 1]
  assert all(row.input_ids[i] == PAD_ID for i in perm[-5:-2])  # Fillers: padding first.

  def logits(first_content):
    ids = row.input_ids.copy()
    ids[first], ids[second] = first_content, 50
    batch = {"input_ids": ids, "token_type_ids": row.token_type_ids, "plm_perm": perm,
             "plm_target_weights": weights}
    return direct_logits(run, batch, "plm")[-2:]

  a, b = logits(60), logits(200)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)  # Its own content: unseen.
  assert not np.allclose(a[1], b[1], atol=1e-4)  # The later target sees it.


# CLM.


def test_clm_predicts_the_next_piece_from_the_prefix_alone(clm):
  row = clm.encode("The hacker wrote")
  base = clm.predict_rows([row])[0]
  assert [p["position"] for p in base] == [row.length - 1]
  ids = row.input_ids.copy()
  ids[row.length:row.length + 6] = 100  # Pieces after the prefix change nothing.
  after = clm.predict_rows([dataclasses.replace(row, input_ids=ids)])[0]
  np.testing.assert_allclose(top_logits(after), top_logits(base), rtol=1e-6, atol=1e-6)
  ids = row.input_ids.copy()
  ids[1] = 100  # An earlier piece does.
  before = clm.predict_rows([dataclasses.replace(row, input_ids=ids)])[0]
  assert not np.allclose(top_logits(before), top_logits(base), atol=1e-4)

  run = clm.pretrained
  full = direct_logits(run, {"input_ids": row.input_ids, "token_type_ids": row.token_type_ids},
                       "clm")[row.length - 1, :512]
  assert [t["id"] for t in base[0]["top"]] == np.argsort(-full)[:4].tolist()

  # Greedy continuation: its first piece is the top prediction (none when that ends the text).
  (result,) = clm(["The hacker wrote"], max_new_tokens=3)
  pieces = clm.continue_rows([row], 3)[0]
  best = base[0]["top"][0]["id"]
  assert pieces[:1] == ([] if best == SEP_ID else [best]) and len(pieces) <= 3
  assert result["continuation"] == clm._continuation(result["input_ids"], pieces)


# Errors.


@pytest.mark.parametrize("text, message", [
    ("The hacker wrote.", "text 1 has no \\[MASK\\]"),
    ("   ", "text 1 has no pieces"),
    ("", "text 1 has no pieces"),
    ("a [SEP] b [SEP] [MASK]", "at most two"),
    ("[MASK]\t  ", "empty segment B"),
    ("[MASK] " + "hacker " * 40, "data.seq_len = 32"),
])
def test_text_errors(mlm, text, message):
  with pytest.raises(UserError, match=message):
    mlm([text])


def test_head_specific_errors(plm, clm, mlm):
  with pytest.raises(UserError, match="line 3 of in.txt has no \\[MASK\\]: a PLM"):
    plm(["[MASK] a", "b [MASK]", "c"], names=["line 1 of in.txt", "line 2 of in.txt",
                                              "line 3 of in.txt"])
  with pytest.raises(UserError, match="at most 5"):
    plm([" ".join(["[MASK]"] * 6)])
  with pytest.raises(UserError, match="causal"):
    clm(["The [MASK] wrote"])
  with pytest.raises(UserError, match="max_new_tokens"):
    mlm(["The [MASK]."], max_new_tokens=2)


def test_file_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    fill_mask_lib.read_texts(str(tmp_path / "missing.txt"))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(UserError, match="is empty"):
    fill_mask_lib.read_texts(str(tmp_path / "empty.txt"))
  source = tmp_path / "in.txt"
  source.write_text("The [MASK].\r\n\tb\n")
  assert fill_mask_lib.read_texts(str(source)) == ["The [MASK].", "\tb"]
  for output in (source / "out.jsonl", tmp_path / "no" / "out.jsonl"):  # Not writable folders.
    with pytest.raises(UserError, match="Cannot write the output"):
      fill_mask_lib.check_output(str(output))
  with pytest.raises(UserError, match="is a folder"):
    fill_mask_lib.check_output(str(tmp_path))
  fill_mask_lib.check_output(str(tmp_path / "out.jsonl"))
  assert sorted(os.listdir(tmp_path)) == ["empty.txt", "in.txt"]  # The check leaves nothing.


def test_text_printout():
  item = {"text": "The [MASK].", "predictions": [{"position": 2, "top": [
      {"token": "\u2581the", "id": 9, "logit": 2.0, "prob": 0.4123},
      {"token": "\u2581a", "id": 8, "logit": 1.0, "prob": 0.1009}]}]}
  assert fill_mask_lib.format_predictions(item, "mlm") == (
      "The [MASK].\n  [MASK] #1 (position 2): \u2581the 0.412  \u2581a 0.101")


# The command line.


def run_cli(repo_root, *args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  return subprocess.run([sys.executable, "-m", "jaxlm.predict", *args], cwd=repo_root, env=env,
                        capture_output=True, text=True)


def test_cli_writes_jsonl(workdir, mlm, tmp_path, repo_root):
  source, output = tmp_path / "in.txt", tmp_path / "out.jsonl"
  source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
  done = run_cli(repo_root, f"--workdir={workdir}", f"--input={source}", f"--output={output}",
                 "--top_k=3", "--batch_size=2")
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
  want = mlm(TEXTS)
  assert len(lines) == 3
  for line, expected in zip(lines, want):
    assert list(line) == ["text", "input_ids", "predictions"]
    assert line["text"] == expected["text"] and line["input_ids"] == expected["input_ids"]
    for prediction, other in zip(line["predictions"], expected["predictions"]):
      assert list(prediction) == ["position", "top"]
      assert prediction["position"] == other["position"]
      assert [list(t) for t in prediction["top"]] == [["token", "id", "logit", "prob"]] * 3
      assert [t["id"] for t in prediction["top"]] == [t["id"] for t in other["top"][:3]]


def test_cli_error(workdir, tmp_path, repo_root):
  """A user error exits 1 with its message and no traceback."""
  done = run_cli(repo_root, f"--workdir={workdir}", f"--input={tmp_path / 'missing.txt'}",
                 f"--output={tmp_path / 'o.jsonl'}")
  assert done.returncode == 1, done.stderr[-2000:]
  assert f"Error: The input file {tmp_path / 'missing.txt'} does not exist." in done.stderr
  assert "Traceback" not in done.stderr
