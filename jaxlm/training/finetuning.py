"""Classification fine-tuning as a `trainer.Task`: a pretrained encoder, a new head on its
pooled [CLS] output, labelled files, and optionally LoRA.

The encoder comes from a jaxlm run (`init_from`, parameters only) or a Hugging Face folder
(`init_from_hf`); the tokenizer comes with it and is copied into the workdir, with the label map
(`labels.json`), so the fine-tuned run is self-contained. With LoRA the pretrained weights are
frozen: rebuilt from the source on every start, never in the optimizer state or a checkpoint.
"""

import dataclasses
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxlm import config as config_lib
from jaxlm.data import labelled, setup as data_setup, tokenizer as tokenizer_lib
from jaxlm.errors import UserError
from jaxlm.models import ModelConfig, Pretrainer
from jaxlm.objectives import Classify
from jaxlm.training import flops, lora, trainer
from jaxlm.training.workdir import prepare_workdir

LABELS_FILE = "labels.json"


@dataclasses.dataclass
class Source:
  """What fine-tuning starts from."""

  model_config: ModelConfig
  encoder: Any  # The pretrained `encoder` subtree (arrays).
  tokenizer_path: str
  description: str


def _validate(config: ml_collections.ConfigDict) -> None:
  if bool(config.init_from) == bool(config.init_from_hf):
    raise UserError("Set exactly one of --config.init_from=<pretraining workdir> and "
                    "--config.init_from_hf=<Hugging Face folder>: fine-tuning starts from a "
                    "pretrained encoder.")
  for key in ("train_file", "eval_file"):
    path = config.data[key]
    if not path:
      raise UserError(f"Set --config.data.{key}=<JSONL, TSV or CSV file with text[, text_b], "
                      "label columns>.")
    if not os.path.isfile(path):
      raise UserError(f"data.{key} '{path}' does not exist.")
  for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "microbatches"):
    if config.train[key] <= 0:
      raise UserError(f"train.{key} is {config.train[key]}; it must be a positive integer.")
  config_lib.validate_trainer_options(config.train)


def load_source(config: ml_collections.ConfigDict) -> Source:
  """The pretrained encoder, its model config and its tokenizer."""
  if config.init_from:
    from jaxlm.training import pretrained

    run = pretrained.load(config.init_from, None if config.init_step < 0 else config.init_step)
    encoder = jax.tree_util.tree_map(np.asarray, run.params["encoder"])
    return Source(run.model_config, encoder, run.tokenizer.path,
                  f"{os.path.abspath(config.init_from)} step {run.step}")
  from jaxlm import hf

  overrides, params = hf.import_hf(config.init_from_hf)
  tokenizer_path = hf.import_tokenizer(config.init_from_hf)
  if tokenizer_path is None:
    raise UserError(f"{config.init_from_hf} has no jaxlm tokenizer (tokenizer.model): "
                    "fine-tuning needs the pieces the model was trained on. Export the model "
                    "with `python -m jaxlm.export`, which saves it.")
  model_config = ModelConfig.from_config(ml_collections.ConfigDict(
      {**_model_dict(ModelConfig()), **overrides}))
  return Source(model_config, params["encoder"], tokenizer_path,
                os.path.abspath(config.init_from_hf))


def _place(fresh: Any, loaded: Any, where: str) -> Any:
  """`loaded` arrays in the shardings of `fresh` (a freshly initialised tree of the same
  structure); a differing structure or shape is a UserError naming the parameter."""
  fresh_paths = dict(jax.tree_util.tree_flatten_with_path(fresh)[0])
  loaded_paths = dict(jax.tree_util.tree_flatten_with_path(loaded)[0])
  if set(fresh_paths) != set(loaded_paths):
    missing = sorted(map(jax.tree_util.keystr, set(fresh_paths) - set(loaded_paths)))
    extra = sorted(map(jax.tree_util.keystr, set(loaded_paths) - set(fresh_paths)))
    raise UserError(f"The pretrained encoder of {where} does not fit this model: missing "
                    f"{missing[:3]}, unexpected {extra[:3]}.")

  def put(path, target, value):
    if tuple(np.shape(value)) != tuple(target.shape):
      raise UserError(f"The pretrained {jax.tree_util.keystr(path)} of {where} has shape "
                      f"{tuple(np.shape(value))}, the model's is {tuple(target.shape)}.")
    return jax.device_put(np.asarray(value, target.dtype), target.sharding)

  return jax.tree_util.tree_map_with_path(lambda p, t: put(p, t, loaded_paths[p]), fresh)


def _label_map(workdir: str, train_file: str, tokenizer, seq_len: int):
  """The training set, with the label map a resumed run saved (the classes never move)."""
  path = os.path.join(workdir, LABELS_FILE)
  saved = labelled.LabelMap.load(path) if os.path.isfile(path) else None
  train = labelled.load_set(train_file, tokenizer, seq_len, saved)
  if saved is None and jax.process_index() == 0:
    train.label_map.save(path)
  return train


def lora_options(config: ml_collections.ConfigDict) -> lora.LoraOptions | None:
  if config.lora.rank == 0:
    return None
  targets = config.lora.targets
  targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)
                  if t.strip())
  return lora.LoraOptions(rank=int(config.lora.rank), alpha=float(config.lora.alpha),
                          targets=targets)


def finetuning_task(config: ml_collections.ConfigDict, workdir: str) -> trainer.Task:
  source = load_source(config)
  model_config = source.model_config
  if config.finetune.dropout_rate >= 0:
    model_config = dataclasses.replace(model_config, dropout_rate=config.finetune.dropout_rate,
                                       attention_dropout_rate=config.finetune.dropout_rate)
  d = config.data
  if d.seq_len > model_config.max_position and model_config.position_encoding == "absolute":
    raise UserError(f"data.seq_len ({d.seq_len}) exceeds the pretrained model's max_position "
                    f"({model_config.max_position}); lower --config.data.seq_len.")
  kept = os.path.join(workdir, data_setup.TOKENIZER_FILE)
  if jax.process_index() == 0 and os.path.abspath(source.tokenizer_path) != os.path.abspath(kept):
    shutil.copyfile(source.tokenizer_path, kept)
  tokenizer = tokenizer_lib.Tokenizer(source.tokenizer_path)
  train = _label_map(workdir, d.train_file, tokenizer, d.seq_len)
  evaluation_set = labelled.load_set(d.eval_file, tokenizer, d.seq_len, train.label_map)
  objective = Classify(train.label_map.num_classes)
  model = Pretrainer(model_config, heads=((objective.name, objective.head),))
  seed = config.seeds.data if config.seeds.data >= 0 else config.train.seed

  def loader(data, is_train):
    return labelled.LabelledLoader(
        data, global_batch_size=d.batch_size, train=is_train, seed=seed,
        process_index=jax.process_index(), process_count=jax.process_count())

  def initial_params(fresh):
    return {**fresh, "encoder": _place(fresh["encoder"], source.encoder, source.description)}
  trainable = trainer.Trainable()
  options = lora_options(config)
  if options is not None:
    def select(rng, boxed):
      return {"adapters": lora.init_adapters(rng, boxed, options),
              objective.name: boxed[objective.name]}

    def merge(trained, frozen):
      return lora.merge({**frozen, objective.name: trained[objective.name]},
                        trained["adapters"], options)

    trainable = trainer.Trainable(select=select, merge=merge)
  logging.info("Fine-tuning %s on %s (%d examples, %d classes %s), eval %s (%d)%s",
               source.description, d.train_file, len(train), train.label_map.num_classes,
               list(train.label_map.labels), d.eval_file, len(evaluation_set),
               f"; LoRA rank {options.rank} on {options.projections}" if options else "")
  return trainer.Task(
      model=model, objectives=[objective], train_loader=loader(train, True),
      eval_sets={"eval": ([objective], loader(evaluation_set, False))},
      data_fingerprint=f"{train.fingerprint}+{evaluation_set.fingerprint}",
      data_description={"train": train.description, "eval": evaluation_set.description,
                        "init_from": source.description},
      flops_per_token=flops.training_flops_per_token(model_config, d.seq_len, [objective]),
      initial_params=initial_params, trainable=trainable)


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Fine-tunes (or resumes) the classifier `config` describes in `workdir`."""
  _validate(config)
  prepare_workdir(workdir)
  task = finetuning_task(config, workdir)
  with config.unlocked():  # Record the model actually trained, for evaluate/predict/export.
    config.model = ml_collections.ConfigDict(_model_dict(task.model.config))
  return trainer.fit(config, workdir, task)


def _model_dict(model_config: ModelConfig) -> dict:
  values = dataclasses.asdict(model_config)
  for key in ("dtype", "param_dtype"):
    values[key] = np.dtype(values[key]).name
  return values
