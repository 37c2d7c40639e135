"""The base config: every key jaxlm reads, with its meaning. Experiments start from this.

Any key can be overridden from the command line, e.g. `--config.train.steps=1000`; a key not
declared here is an error.
"""

import ml_collections

from configs import meshes, models, optimizers


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.train = ml_collections.ConfigDict(
      dict(
          steps=1000,  # Optimizer steps in the whole run (also the length of the LR schedule).
          seed=0,  # Parameters, dropout, data order and masks all derive from it.
          # Gradient accumulation: each step runs the batch in this many slices (memory of one
          # slice) and averages their gradients before one update.
          microbatches=1,
          log_every=50,  # Write metrics.jsonl / TensorBoard rows every this many steps.
          eval_every=500,  # Evaluate on the eval split every this many steps (and at the end).
          eval_batches=8,  # Batches per evaluation (the eval split is cycled if smaller).
          checkpoint_every=1000,  # Save a checkpoint every this many steps (and at the end).
          keep_checkpoints=3,  # Keep the newest this many checkpoints.
          max_consecutive_skips=5,  # Stop after this many steps in a row with non-finite loss.
          divergence_loss=100.0,  # Stop when a step's loss exceeds this: the run has diverged.
          peak_tflops_per_device=0.0,  # For MFU; 0 looks it up from the device kind.
      )
  )

  config.data = ml_collections.ConfigDict(
      dict(
          train_files="",  # Comma-separated paths/globs (.txt or .txt.gz); "" = embedded corpus.
          eval_files="",  # "" = hold out documents of the training files (eval_fraction).
          eval_fraction=0.05,  # Share of documents held out when eval_files is "".
          tokenizer="",  # A jaxlm sentencepiece .model; "" = train one into the workdir.
          tokenizer_type="unigram",  # unigram | bpe, when training one.
          tokenizer_vocab_size=0,  # Pieces when training one; 0 = model.vocab_size.
          seq_len=128,
          batch_size=256,  # Global: split over hosts and the data/fsdp mesh axes.
          short_seq_prob=0.1,  # Share of examples with a random shorter target length.
      )
  )

  config.model = models.bert("base")
  config.optimizer = optimizers.adamw_bert()

  # data: batch split; fsdp: batch split and parameters/optimizer state sharded (ZeRO-3);
  # tensor: Megatron-style split of heads, MLP and vocabulary. -1 = all remaining devices.
  # rules: entries replacing the default logical -> mesh rules (jaxlm/parallel/rules.py), e.g.
  # "embed=none,mlp=fsdp+tensor" (none = replicated, + joins mesh axes).
  config.mesh = meshes.data_parallel()

  # One entry per objective; weight 0 disables it (its head and its data work too).
  config.objectives = ml_collections.ConfigDict(
      dict(
          mlm=dict(
              weight=1.0,
              mask_rate=0.15,  # Share of non-special tokens to predict.
              max_predictions_per_seq=20,  # At most this many predictions per sequence.
              mask_token_prob=0.8,  # Of the chosen: replaced by [MASK] ...
              random_token_prob=0.1,  # ... by a random token; the rest keep theirs.
              whole_word=False,  # Choose whole words (all their pieces) at once.
          ),
          nsp=dict(
              weight=1.0,
              random_next_prob=0.5,  # How often segment B comes from another document.
          ),
      )
  )
  return config
