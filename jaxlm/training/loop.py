"""Pretraining: the run `config` describes, as a `trainer.Task` handed to the reusable trainer.

What is pretraining-specific lives here: the prepared corpus and its fixed eval sets, the
objectives and their heads, and the FLOPs of their passes. Everything else (resume, steps,
logging, evaluation, checkpoints) is `trainer.fit`, shared with fine-tuning.
"""

import jax
import ml_collections

from jaxlm import config as config_lib
from jaxlm.models import ModelConfig, Pretrainer
from jaxlm.training import flops, inputs, trainer
from jaxlm.training.interval import TrainingStopped  # noqa: F401 (re-exported)
from jaxlm.training.trainer import seed_keys  # noqa: F401 (re-exported)
from jaxlm.training.workdir import prepare_workdir  # noqa: F401 (re-exported)


def pretraining_task(config: ml_collections.ConfigDict, workdir: str) -> trainer.Task:
  """The data, objectives and model of a pretraining run (process 0 prepares the data)."""
  model_config = ModelConfig.from_config(config.model)
  sources, objectives, train_loader, eval_sets = inputs.build_inputs(
      config, workdir, model_config.vocab_size, jax.process_index(), jax.process_count())
  return trainer.Task(
      model=Pretrainer.for_objectives(model_config, objectives),
      objectives=objectives,
      train_loader=train_loader,
      eval_sets=eval_sets,
      data_fingerprint=sources.fingerprint,
      data_description=sources.description,
      flops_per_token=flops.training_flops_per_token(model_config, config.data.seq_len,
                                                      objectives),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run described by `config` in `workdir`; returns the last row."""
  config_lib.validate(config, jax.process_count())
  prepare_workdir(workdir)
  trainer.write_config(config, workdir)
  trainer.make_mesh(config, jax.process_count())  # Mesh mistakes before data preparation.
  return trainer.fit(config, workdir, pretraining_task(config, workdir))
