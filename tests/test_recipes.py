"""No silent recipe changes: every experiment is free of them, and each rule fires when it must."""

import glob
import logging
import os

import pytest

from jaxlm import config as config_lib
from conftest import experiment_config

EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                 "*.py")))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_its_recipe_as_written(name):
  assert config_lib.recipe_warnings(experiment_config(name)) == []


def test_the_presets_run_their_recipes_as_written():
  from configs import base, recipes

  assert config_lib.recipe_warnings(base.get_config()) == []
  assert config_lib.recipe_warnings(recipes.tiny_fast()) == []


def test_warm_up_as_long_as_the_run_is_flagged():
  config = experiment_config("bert_mini")
  config.train.steps = config.optimizer.warmup_steps
  (warning,) = config_lib.recipe_warnings(config)
  assert "warmup_steps (100) >= train.steps (100)" in warning


def test_mlm_predictions_capped_below_the_rate_are_flagged():
  config = experiment_config("bert_mini")
  config.data.seq_len, config.model.max_position = 512, 512
  config.objectives.mlm.max_predictions_per_seq = 20  # BERT's figure for seq 128.
  (warning,) = config_lib.recipe_warnings(config)
  assert "3.9% of 512 tokens" in warning and "-1" in warning
  config.objectives.mlm.max_predictions_per_seq = -1
  assert config_lib.recipe_warnings(config) == []
  config.objectives.mlm.weight = 0.0  # MLM off: its cap does not matter.
  config.objectives.mlm.max_predictions_per_seq = 20
  assert config_lib.recipe_warnings(config) == []


def test_resuming_with_other_steps_is_flagged_unless_the_rate_is_constant():
  config = experiment_config("bert_tiny")
  assert config_lib.resume_warnings(config, None) == []
  assert config_lib.resume_warnings(config, config.train.steps) == []
  (warning,) = config_lib.resume_warnings(config, 100)
  assert "the run started with 100" in warning
  config.optimizer.decay = "constant"
  assert config_lib.resume_warnings(config, 100) == []


def test_the_loop_logs_a_stretched_schedule_on_resume(tmp_path, caplog):
  from jaxlm.training import loop

  config = experiment_config("bert_tiny")
  config.train.steps, config.train.eval_every, config.data.eval_examples = 2, 2, 16
  config.data.batch_size = 16
  workdir = str(tmp_path / "run")
  with caplog.at_level(logging.WARNING):
    loop.train_and_evaluate(config, workdir)
  assert "warmup_steps (20) >= train.steps (2)" in caplog.text
  caplog.clear()
  config.train.steps = 3
  with caplog.at_level(logging.WARNING):
    loop.train_and_evaluate(config, workdir)
  assert "train.steps is 3, the run started with 2" in caplog.text
