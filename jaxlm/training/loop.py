"""Pretraining: the run `config` describes, as a `trainer.Task` handed to the reusable trainer.

What is pretraining-specific lives here: the prepared corpus and its fixed eval sets, the
objectives and their heads, and the FLOPs of their passes. Everything else (resume, steps,
logging, evaluation, checkpoints) is `trainer.fit`, shared with fine-tuning.
"""

import jax
import ml_collections
from absl import logging

from jaxlm import config as config_lib
from jaxlm.errors import UserError
from jaxlm.models import ModelConfig, Pretrainer
from jaxlm.training import flops, inputs, trainer
from jaxlm.training.interval import TrainingStopped  # noqa: F401 (re-exported)
from jaxlm.training.trainer import seed_keys  # noqa: F401 (re-exported)
from jaxlm.training.workdir import prepare_workdir  # noqa: F401 (re-exported)


def _from_hf(config: ml_collections.ConfigDict):
  """`init_from_hf`: the folder's model sizes and tokenizer put into `config` (logged), and the
  hook that puts its weights onto the fresh initialisation."""
  from jaxlm import hf

  directory = config.init_from_hf
  overrides, imported = hf.import_hf(directory, scan_layers=config.model.scan_layers)
  changed = {k: (config.model[k], v) for k, v in overrides.items() if config.model[k] != v}
  if changed:
    logging.info("init_from_hf: config.model takes the folder's %s",
                 ", ".join(f"{k}={new} (was {old})" for k, (old, new) in changed.items()))
  tokenizer = hf.import_tokenizer(directory)
  with config.unlocked():
    config.model.update(overrides)
    if tokenizer and not config.data.tokenizer:
      config.data.tokenizer = tokenizer
  if not config.data.tokenizer:
    raise UserError(f"{directory} has no tokenizer.model (a jaxlm sentencepiece model): set "
                    "--config.data.tokenizer to the tokenizer the checkpoint was trained with.")

  def initial_params(fresh):
    merged = hf.overlay(jax.device_get(fresh), imported)
    if merged.kept:
      logging.info("init_from_hf: %d arrays start fresh (the folder lacks them): %s",
                   len(merged.kept), ", ".join(merged.kept[:6]))
    return jax.tree_util.tree_map(lambda value, target: jax.device_put(value, target.sharding),
                                  merged.params, fresh)

  return initial_params


def pretraining_task(config: ml_collections.ConfigDict, workdir: str,
                     initial_params=None) -> trainer.Task:
  """The data, objectives and model of a pretraining run (process 0 prepares the data)."""
  model_config = ModelConfig.from_config(config.model)
  sources, objectives, train_loader, eval_sets = inputs.build_inputs(
      config, workdir, model_config.vocab_size, jax.process_index(), jax.process_count())
  return trainer.Task(
      initial_params=initial_params,
      model=Pretrainer.for_objectives(model_config, objectives),
      objectives=objectives,
      train_loader=train_loader,
      eval_sets=eval_sets,
      data_fingerprint=sources.fingerprint,
      data_description=sources.description,
      flops_per_token=flops.training_flops_per_token(model_config, config.data.seq_len,
                                                      objectives,
                                                      rows_per_step=config.data.batch_size),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the run described by `config` in `workdir`; returns the last row."""
  config_lib.validate(config, jax.process_count())
  initial_params = _from_hf(config) if config.get("init_from_hf") else None
  prepare_workdir(workdir)
  trainer.make_mesh(config, jax.process_count())  # Mesh mistakes before data preparation.
  return trainer.fit(config, workdir, pretraining_task(config, workdir, initial_params))
