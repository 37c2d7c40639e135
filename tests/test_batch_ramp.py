"""The batch-size ramp (issue 13): its schedule, the loader's examples under it, the options'
checks, and tiny training runs whose logged tokens follow it and whose resumption mid-ramp is
exact.

The runs need 8 simulated CPU devices (tests/conftest.py asks for them).
"""

import numpy as np
import pytest

from configs import base
from jaxlm import config as config_lib
from jaxlm.data import loader as loader_lib
from jaxlm.data.batch_schedule import BatchSchedule
from jaxlm.errors import UserError
from jaxlm.training import loop, preemption, trainer
from jaxlm.training.metrics import read_metrics
from conftest import TOKENIZER_VOCAB, experiment_config

# ---- the schedule ----


@pytest.mark.parametrize("batch,start,ramp", [(16, 4, 10), (16, 8, 2), (12, 3, 7), (8, 8, 5),
                                              (256, 32, 1000)])
def test_sizes_and_offsets_match_a_cumulative_sum(batch, start, ramp):
  schedule = BatchSchedule(batch, start, ramp)
  steps = ramp + 5
  sizes_S = np.array([schedule.size(s) for s in range(steps)])
  assert sizes_S[0] == start and (sizes_S[ramp - 1:] == batch).all()
  assert (np.diff(sizes_S) >= 0).all() and (sizes_S % start == 0).all()
  assert sorted(set(sizes_S.tolist())) == schedule.sizes() == list(range(start, batch + 1, start))
  lengths = np.unique(sizes_S[:ramp], return_counts=True)[1]
  assert lengths.max() - lengths.min() <= 1  # Stages of equal length, up to rounding.
  want = np.concatenate([[0], np.cumsum(sizes_S)])
  assert [schedule.offset(s) for s in range(steps + 1)] == want.tolist()
  for step in (0, 1, ramp // 2, ramp, steps):
    by_size = schedule.rows_by_size(step)
    assert sum(by_size.values()) == want[step]


def test_no_ramp_is_the_constant_batch():
  schedule = BatchSchedule(16, 0, 0)
  assert [schedule.size(s) for s in range(3)] == [16] * 3
  assert [schedule.offset(s) for s in range(3)] == [0, 16, 32] and schedule.sizes() == [16]


# ---- the loader ----


class _Numbers:
  """A format whose example i is the number i (so a batch shows which examples it took)."""

  def __len__(self):
    return 10**6

  def examples(self, indices, keys):
    return {"x": np.asarray(indices, np.int64)[:, None]}


def _loader(schedule, process_index=0, process_count=1):
  return loader_lib.BatchLoader(_Numbers(), global_batch_size=schedule.batch_size, transforms=(),
                                seed=0, process_index=process_index,
                                process_count=process_count, shuffle=False, schedule=schedule)


def test_consecutive_batches_take_exactly_their_offset_ranges():
  schedule = BatchSchedule(16, 4, 8)
  loader = _loader(schedule)
  taken = [loader.batch(s)["x"][:, 0] for s in range(12)]
  for step, rows in enumerate(taken):
    assert rows.tolist() == list(range(schedule.offset(step), schedule.offset(step + 1)))
  every = np.concatenate(taken)
  assert len(np.unique(every)) == len(every) == schedule.offset(12)


def test_two_processes_rows_concatenate_to_the_one_process_batch():
  schedule = BatchSchedule(16, 4, 8)
  one = _loader(schedule)
  halves = [_loader(schedule, p, 2) for p in range(2)]
  for step in range(12):
    parts = [h.batch(step)["x"] for h in halves]
    assert all(len(p) == schedule.size(step) // 2 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), one.batch(step)["x"])


def test_shuffled_stream_without_a_ramp_is_unchanged():
  """A constant schedule gives exactly the batches of no schedule (today's arithmetic)."""
  kwargs = dict(global_batch_size=8, transforms=(), seed=3)
  plain = loader_lib.BatchLoader(_Numbers(), **kwargs)
  scheduled = loader_lib.BatchLoader(_Numbers(), schedule=BatchSchedule(8, 0, 0), **kwargs)
  for step in (0, 5):
    np.testing.assert_array_equal(plain.batch(step)["x"], scheduled.batch(step)["x"])


def test_worker_processes_give_the_growing_batches():
  schedule = BatchSchedule(16, 4, 4)
  loader = _loader(schedule)
  got = list(loader.iterate(1, 7, workers=2))
  assert [s for s, _ in got] == list(range(1, 7))
  for step, batch in got:
    np.testing.assert_array_equal(batch["x"], loader.batch(step)["x"])


# ---- the options' checks ----


def _config(**train):
  config = base.get_config()
  config.data.batch_size = 16
  config.train.update(**train)
  return config


@pytest.mark.parametrize("train,match", [
    (dict(batch_ramp_steps=-1), "must be >= 0"),
    (dict(batch_ramp_start=4), "batch_ramp_steps is 0"),
    (dict(batch_ramp_steps=10), "positive divisor"),
    (dict(batch_ramp_steps=10, batch_ramp_start=5), "positive divisor"),
    (dict(batch_ramp_steps=3, batch_ramp_start=4), "every stage needs a step"),
])
def test_bad_ramps_are_refused(train, match):
  with pytest.raises(UserError, match=match):
    config_lib.validate(_config(**train))


def test_ramp_start_must_split_over_processes_and_devices():
  with pytest.raises(UserError, match="3 processes"):
    config = _config(batch_ramp_steps=10, batch_ramp_start=4)
    config.data.batch_size = 12
    config_lib.validate(config, process_count=3)
  config = _config(batch_ramp_steps=10, batch_ramp_start=4)  # 8 data-parallel devices.
  config_lib.validate(config)
  with pytest.raises(UserError, match="batch_ramp_start \\(4\\) is not divisible"):
    trainer.make_mesh(config, 1)


def test_a_ramp_past_the_run_is_a_recipe_warning():
  config = _config(batch_ramp_steps=10, batch_ramp_start=8, steps=10)
  assert any("inside the batch-size ramp" in w for w in config_lib.recipe_warnings(config))
  assert not config_lib.recipe_warnings(_config())


# ---- training ----

RAMP = BatchSchedule(16, 8, 6)  # Steps 0-2 at 8 rows, then 16.
SEQ_LEN = 32


def _run_config(prepared_corpus):
  config = experiment_config("bert_tiny")
  config.train.update(steps=8, log_every=1, eval_every=8, checkpoint_every=8,
                      batch_ramp_steps=RAMP.ramp_steps, batch_ramp_start=RAMP.ramp_start)
  config.data.update(train_files=prepared_corpus.directory, batch_size=RAMP.batch_size,
                     seq_len=SEQ_LEN, eval_examples=16)
  config.model.update(vocab_size=TOKENIZER_VOCAB, max_position=SEQ_LEN)
  return config


def _train_rows(workdir):
  return [r for r in read_metrics(f"{workdir}/metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def ramped_run(tmp_path_factory, prepared_corpus):
  workdir = str(tmp_path_factory.mktemp("ramp") / "run")
  loop.train_and_evaluate(_run_config(prepared_corpus), workdir)
  return workdir


def test_logged_tokens_follow_the_ramp(ramped_run):
  rows = _train_rows(ramped_run)
  assert [r["step"] for r in rows] == list(range(1, 9))
  for row in rows:
    assert row["tokens_seen"] == RAMP.offset(row["step"]) * SEQ_LEN
    assert np.isfinite(row["loss"]) and row["tokens_per_sec"] > 0 and row["mfu"] > 0
  # Model FLOPs per token stay the model's (absolute positions: no per-step share).
  per_token = [r["model_flops"] / r["tokens_seen"] for r in rows]
  assert max(per_token) == pytest.approx(min(per_token))


def test_resume_mid_ramp_gives_the_same_losses(ramped_run, prepared_corpus, tmp_path,
                                               monkeypatch):
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as patch:  # As a SIGTERM after step 2 would.
    patch.setattr(preemption.StopRequest, "should_stop", lambda self, step: step == 2)
    loop.train_and_evaluate(_run_config(prepared_corpus), workdir)
  assert [r["step"] for r in _train_rows(workdir)] == [1, 2]
  loop.train_and_evaluate(_run_config(prepared_corpus), workdir)
  keys = ("step", "loss", "mlm_loss", "nsp_loss", "tokens_seen", "model_flops")
  assert ([{k: r[k] for k in keys} for r in _train_rows(workdir)]
          == [{k: r[k] for k in keys} for r in _train_rows(ramped_run)])
