"""A trained run, loaded back for what comes after pretraining: its config, tokenizer, model and
parameters (no optimizer state), from the workdir alone.

`evaluate`, `predict`, `export` and fine-tuning's `init_from` all start here, so they read a run
exactly as training wrote it: `config.json`, `tokenizer.model` and `checkpoints/<step>`.
"""

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from jaxlm.data import setup as data_setup, tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.models import ModelConfig, Pretrainer
from jaxlm.objectives import DataSpec, Objective, build_objectives
from jaxlm.parallel import mesh as mesh_lib, rules as rules_lib
from jaxlm.training import checkpoints, state as state_lib

CONFIG_FILE = "config.json"


@dataclasses.dataclass
class Pretrained:
  config: ml_collections.ConfigDict  # The run's config (with any overrides applied).
  model_config: ModelConfig
  objectives: list[Objective]
  model: Pretrainer
  params: Any  # Unboxed, sharded over `mesh`.
  tokenizer: tokenizer_lib.Tokenizer
  step: int
  mesh: jax.sharding.Mesh
  rules: rules_lib.Rules


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with, as it saved it in `<workdir>/config.json`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise UserError(f"{workdir} is not a jaxlm run folder (it has no {CONFIG_FILE}): pass the "
                    "--workdir of a finished or running `python -m jaxlm.train`.")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """`--config=<this file>:<workdir>`: the saved config, so `--config.k=v` overrides it (the
  entry points after pretraining pass this for the user; see `cli.use_saved_config`)."""
  return read_config(workdir)


def inference_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The run's mesh when it fits the devices here, else every device on the data axis (a run
  trained on a pod is evaluated on a laptop)."""
  try:
    return mesh_lib.make_mesh(config.mesh)
  except UserError:
    logging.info("The run's mesh %s does not fit %d devices; using data=-1.",
                 dict(config.mesh), jax.device_count())
    return mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def model_inputs(objectives: list[Objective], seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of a one-row batch as the objectives' host transforms make it (MLM's positions,
  PLM's order), enough to give every parameter its shape."""
  ids = np.full((1, seq_len), tokenizer_lib.UNK_ID, np.int32)
  ids[:, 0], ids[:, -1] = tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID
  batch = {"input_ids": ids, "token_type_ids": np.zeros_like(ids)}
  for objective in objectives:
    batch = objective.host_transform(batch, np.zeros(1, np.uint64))
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}


def load(workdir: str, step: int | None = None,
         config: ml_collections.ConfigDict | None = None) -> Pretrained:
  """Loads the run in `workdir` at `step` (default: its newest checkpoint).

  `config` replaces the saved config (the saved one with command-line overrides applied); the
  model sizes must stay those of the checkpoint, which restoring checks.
  """
  config = config if config is not None else read_config(workdir)
  tokenizer_path = os.path.join(workdir, data_setup.TOKENIZER_FILE)
  if not os.path.isfile(tokenizer_path):
    raise UserError(f"{workdir} has no {data_setup.TOKENIZER_FILE}; it is written when training "
                    "starts. Pass the --workdir of a jaxlm training run.")
  tokenizer = tokenizer_lib.Tokenizer(tokenizer_path)
  model_config = ModelConfig.from_config(config.model)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise UserError(f"The tokenizer of {workdir} has {tokenizer.vocab_size} pieces but "
                    f"model.vocab_size is {model_config.vocab_size}: the config does not belong "
                    "to this run.")
  spec = DataSpec(vocab_size=tokenizer.vocab_size, seq_len=config.data.seq_len,
                  word_start=tokenizer.word_start)
  objectives = build_objectives(config.objectives, spec, config.get("eval"))
  model = Pretrainer.for_objectives(model_config, objectives)
  mesh = inference_mesh(config)
  rules = rules_lib.rules_from_config(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    abstract = state_lib.abstract_params(model, model_inputs(objectives, config.data.seq_len),
                                         mesh, rules)
  params, step = checkpoints.restore_params(os.path.join(workdir, "checkpoints"), abstract, step)
  return Pretrained(config=config, model_config=model_config, objectives=objectives, model=model,
                    params=params, tokenizer=tokenizer, step=step, mesh=mesh, rules=rules)
