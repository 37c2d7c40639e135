"""What a run trains and evaluates on: the data, the enabled objectives and their loaders.

Shared by training and `python -m jaxlm.bench --pipeline`, so the benchmark times exactly the
pipeline a run uses.
"""

import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxlm import config as config_lib
from jaxlm.data import batch_schedule, formats, loader as loader_lib, setup as data_setup
from jaxlm.data.formats import packed_pairs
from jaxlm.errors import UserError
from jaxlm.objectives import DataSpec, Objective, build_objectives

# The fixed eval pairs follow BERT's recipe, whatever the training pairs use.
EVAL_PAIRS = {"short_seq_prob": 0.1, "random_next_prob": 0.5}
# name -> (the objectives evaluated on it, its fixed loader)
EvalSets = dict[str, tuple[list[Objective], loader_lib.BatchLoader]]


def build_inputs(
    config: ml_collections.ConfigDict, workdir: str, model_vocab_size: int,
    process_index: int = 0, process_count: int = 1,
) -> tuple[data_setup.DataSources, list[Objective], loader_lib.BatchLoader, EvalSets]:
  """The data, the enabled objectives, the train loader and the fixed eval loaders."""
  d = config.data
  is_main = process_index == 0

  def share_failure(failed: bool) -> bool:
    if process_count == 1:
      return failed
    return bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))

  sources = data_setup.resolve(d, model_vocab_size, workdir, is_main=is_main,
                               share_failure=share_failure)
  tokenizer = sources.tokenizer
  spec = DataSpec(vocab_size=tokenizer.vocab_size, seq_len=d.seq_len,
                  word_start=tokenizer.word_start)
  objectives = build_objectives(config.objectives, spec, config.eval)
  for objective in objectives:
    if objective.formats is not None and d.format not in objective.formats:
      raise UserError(
          f"Objective '{objective.name}' trains on data.format {' or '.join(objective.formats)}, "
          f"not '{d.format}'. Set --config.data.format={objective.formats[0]} or disable it "
          f"with --config.objectives.{objective.name}.weight=0.")
  corrupting = [o.name for o in objectives if o.corrupted_input and o.view == "bidirectional"]
  if len(corrupting) > 1:
    raise UserError(f"Objectives {' and '.join(corrupting)} both corrupt the input of the "
                    "bidirectional pass; enable one of them.")
  if d.pack_examples > 1:
    other_views = [o.name for o in objectives if o.view != "bidirectional"]
    if other_views:
      raise UserError(f"data.pack_examples={d.pack_examples} keeps packed examples apart in the "
                      f"bidirectional pass only, not in {', '.join(other_views)}'s. Set "
                      "--config.data.pack_examples=1 or disable those objectives.")
  example_options = {"random_next_prob": 0.0, "short_seq_prob": d.short_seq_prob}
  for objective in objectives:
    example_options.update(objective.example_options())
  if d.format != "pairs":
    example_options = {}

  def loader(fmt, transforms, seed, stream_id, num_examples=None, schedule=None):
    return loader_lib.BatchLoader(
        fmt, global_batch_size=d.batch_size, transforms=transforms, seed=seed,
        stream_id=stream_id, process_index=process_index, process_count=process_count,
        num_examples=num_examples, schedule=schedule)

  if d.pack_examples > 1:
    train_format = packed_pairs.PackedPairs(sources.train, d.seq_len,
                                            max_examples=d.pack_examples, **example_options)
  else:
    train_format = formats.make_format(d.format, sources.train, d.seq_len, **example_options)
  train = loader(train_format,
                 [(o.name, o.host_transform) for o in objectives],
                 config_lib.resolved_seeds(config)["data"],
                 loader_lib.TRAIN_STREAM, schedule=batch_schedule.from_config(config))
  # The fixed eval sets: sentence windows for token-level objectives, BERT pairs for NSP;
  # each corrupted only by the objectives evaluated on it (NSP sees unmasked pairs in every arm).
  evals = {}
  for name, on_pairs in (("windows", False), ("pairs", True)):
    chosen = [o for o in objectives if o.evaluated_on_pairs == on_pairs]
    if not chosen:
      continue
    fmt = (formats.make_format("pairs", sources.eval, d.seq_len, **EVAL_PAIRS) if on_pairs
           else formats.make_format("full_sentences", sources.eval, d.seq_len))
    evals[name] = (chosen, loader(fmt, [(o.name, o.eval_transform) for o in chosen],
                                  d.eval_seed, loader_lib.EVAL_STREAM, d.eval_examples))
  logging.info("Data %s: %d training examples per pass (%s), eval %s; tokenizer %d pieces",
               sources.fingerprint, train.epoch_size, d.format,
               ", ".join(f"{n} {e[1].num_examples}" for n, e in evals.items()),
               tokenizer.vocab_size)
  return sources, objectives, train, evals
