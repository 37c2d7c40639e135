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
          seed=0,  # The seeds below derive from it unless set.
          # Gradient accumulation: each step runs the batch in this many slices (memory of one
          # slice) and averages their gradients before one update.
          microbatches=1,
          log_every=50,  # Write metrics.jsonl / TensorBoard rows every this many steps.
          eval_every=500,  # Evaluate on the fixed eval set every this many steps (and at the end).
          checkpoint_every=1000,  # Save a checkpoint every this many steps (and at the end).
          keep_checkpoints=3,  # Keep the newest this many checkpoints.
          max_consecutive_skips=5,  # Stop after this many steps in a row with non-finite loss.
          divergence_loss=100.0,  # Stop when a step's loss exceeds this: the run has diverged.
          peak_tflops_per_device=0.0,  # For MFU; 0 looks it up from the device kind.
          # "A,B": a jax.profiler trace of steps A..B (counted from 1, as logged) into
          # <workdir>/profile (several processes: profile/process_<i>), for TensorBoard's
          # profile plugin or Perfetto; "" = none. A run resumed inside A..B traces from its
          # first step.
          profile_steps="",
          # The random bits of dropout: threefry (jax's default; these numbers since the start) |
          # rbg | unsafe_rbg (XLA's RngBitGenerator, MaxText's choice for GPU/TPU; on a 2-core
          # CPU no faster). Only the dropout key changes (parameters, data and checkpoints do
          # not). All three give the same numbers on any mesh here (tested on 8 CPU devices);
          # rbg's bits differ by backend, and on TPU with
          # --xla_tpu_spmd_rng_bit_generator_unsafe=true they would follow the mesh (untested).
          prng_impl="threefry",
          # Batch-size ramp (Cramming, GPT-3): the first batch_ramp_steps steps run in
          # data.batch_size / batch_ramp_start stages of equal length at global batches
          # batch_ramp_start, 2 x batch_ramp_start, ..., data.batch_size, then data.batch_size to
          # the end. batch_ramp_start must divide data.batch_size (and divide by the processes x
          # data-parallel devices x microbatches). Costs one compile of the step per stage.
          # 0 = off: the whole run at data.batch_size.
          batch_ramp_steps=0,
          batch_ramp_start=0,
      )
  )

  config.data = ml_collections.ConfigDict(
      dict(
          # A folder made by `python -m jaxlm.prepare`, or comma-separated paths/globs of text
          # (.txt, .txt.gz, .jsonl, .jsonl.gz), prepared on first use into <workdir>/prepared;
          # "" = the embedded corpus.
          train_files="",
          # "" = the prepared data's eval split (documents held out by a hash of their text);
          # else a prepared folder (its eval split) or text files.
          eval_files="",
          eval_fraction=0.05,  # Share of documents held out when text is prepared on first use.
          tokenizer="",  # A jaxlm sentencepiece .model for text prepared on first use; "" = train one.
          tokenizer_type="unigram",  # unigram | bpe, when training one.
          tokenizer_vocab_size=0,  # Pieces when training one; 0 = model.vocab_size.
          # Example format: pairs (BERT, with NSP labels) | full_sentences (RoBERTa) | packed
          # (documents joined by [SEP], cut into seq_len windows).
          format="pairs",
          seq_len=128,
          batch_size=256,  # Global: split over hosts and the data/fsdp mesh axes.
          # Processes building batches ahead of the step; 0 = one background thread (enough
          # unless host transforms are slow: the pipeline makes millions of tokens/s).
          workers=0,
          short_seq_prob=0.1,  # pairs: share of examples with a random shorter length.
          # pairs, training only: up to this many examples per row, kept apart by the attention
          # mask (MLPerf's packed BERT), so padding costs less; 1 = one per row, as BERT.
          # MLM and NSP only; the eval sets stay one example per row.
          pack_examples=1,
          # The fixed eval set: this many sequences of held-out text, chosen and masked by
          # eval_seed alone (not train.seed, the batch size, the format or the objectives).
          eval_examples=4096,
          eval_seed=1234,
          allow_data_change=False,  # Resume a workdir on data with another fingerprint.
      )
  )

  # Seeds apart, so that an ablation varies one thing at a time: parameters (`init`), what the
  # data gives (`data`: order, pairs, masks, permutations) and dropout (`dropout`). -1 = derive
  # from train.seed. Arms with one init seed share every encoder weight whatever heads they add.
  config.seeds = ml_collections.ConfigDict(dict(init=-1, data=-1, dropout=-1))

  config.model = models.bert("base")
  # Start from a Hugging Face folder (one `python -m jaxlm.export` wrote, or a BERT /
  # RoBERTa-PreLayerNorm checkpoint): its sizes replace config.model's, its weights the fresh
  # initialisation (heads it lacks start fresh), its tokenizer.model becomes data.tokenizer.
  config.init_from_hf = ""
  # BERT's optimizer with a warm-up sized to this file's 1,000 steps (BERT's own 10,000 belong to
  # its 1M steps: experiments/bert_base.py).
  config.optimizer = optimizers.adamw_bert(warmup_steps=100)

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
              # At most this many predictions per sequence; -1 = ceil(mask_rate x seq_len), BERT's
              # 20 at seq 128 and 77 at 512 (a fixed 20 would mask 3.9% at 512).
              max_predictions_per_seq=-1,
              mask_token_prob=0.8,  # Of the chosen: replaced by [MASK] ...
              random_token_prob=0.1,  # ... by a random token; the rest keep theirs.
              whole_word=False,  # Choose whole words (all their pieces) at once.
          ),
          nsp=dict(
              weight=1.0,
              random_next_prob=0.5,  # How often segment B comes from another document.
          ),
          # Causal LM (next token at every position, causal attention; with MLM/NSP on too, a
          # second encoder pass with the same weights). Best on data.format=packed.
          clm=dict(weight=0.0),
          # Permuted LM (XLNet): two-stream attention over a random factorisation order, its own
          # encoder pass over the clean ids (a second pass beside MLM/NSP, same weights).
          plm=dict(
              weight=0.0,
              partial_prediction=6,  # K: predict 1/K of the tokens, the last of the order.
              perm_size=0,  # Local permutation: one order per block of this many; 0 = whole.
              span_targets=False,  # Targets are spans of whole words (1..max_span_words).
              max_span_words=5,
          ),
      )
  )

  # How the fixed eval set is corrupted per objective, the same for every arm of an ablation.
  config.eval = ml_collections.ConfigDict(
      dict(
          mlm=dict(
              mask_rate=0.15,
              max_predictions_per_seq=-1,  # -1 = ceil(mask_rate x seq_len).
              mask_token_prob=0.8,
              random_token_prob=0.1,
              whole_word=False,
          ),
          plm=dict(partial_prediction=6, perm_size=0, span_targets=False, max_span_words=5),
      )
  )
  return config
