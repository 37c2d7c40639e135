"""Base config of classification fine-tuning (`python -m jaxlm.finetune`), every key documented.

The model is the pretrained run's (`init_from`) or the Hugging Face folder's (`init_from_hf`);
only the dropout of fine-tuning is set here. Train, optimizer, mesh and seed keys mean what they
mean in `configs/base.py`.
"""

import ml_collections

from configs import meshes, optimizers


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.init_from = ""  # Workdir of a jaxlm pretraining run: its encoder (and tokenizer).
  config.init_step = -1  # Its checkpoint step; -1 = the newest.
  config.init_from_hf = ""  # Or a Hugging Face folder written by `python -m jaxlm.export`.

  config.data = ml_collections.ConfigDict(dict(
      # JSONL, TSV or CSV with `text`, optional `text_b` and `label` (strings or integers;
      # the training file's labels, sorted, become the classes, saved in <workdir>/labels.json).
      train_file="",
      eval_file="",
      seq_len=128,  # [CLS] text [SEP] (text_b [SEP]); the longer segment is cut first.
      batch_size=32,
      workers=0,
      allow_data_change=False,  # Resume a workdir on files with another fingerprint.
  ))
  config.train = ml_collections.ConfigDict(dict(
      steps=300, seed=0, microbatches=1, log_every=10, eval_every=100, checkpoint_every=300,
      keep_checkpoints=2, max_consecutive_skips=5, divergence_loss=100.0,
      peak_tflops_per_device=0.0, profile_steps="", prng_impl="threefry",
  ))
  config.seeds = ml_collections.ConfigDict(dict(init=-1, data=-1, dropout=-1))
  # BERT's fine-tuning recipe: AdamW, warm-up over the first 10%, linear decay to 0.
  config.optimizer = optimizers.adamw_bert(learning_rate=5e-5, warmup_steps=30)
  config.mesh = meshes.data_parallel()
  config.finetune = ml_collections.ConfigDict(dict(
      dropout_rate=0.1,  # Hidden and attention dropout while fine-tuning; -1 = the model's.
  ))
  # LoRA: rank 0 = off (every weight trains). Otherwise only low-rank adapters of `targets`
  # (projections query, key, value, out, wi, wo, or the groups attention, mlp) and the new head
  # train; the pretrained weights stay frozen and out of the optimizer and the checkpoints.
  config.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="query,value"))
  return config
