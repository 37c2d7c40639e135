"""What each choice of the modern recipe buys: `modern_mini.py` against BERT's, one part at a time.

  python -m jaxlm.sweep --config=experiments/ablation_modern.py --workdir=runs/modern \
      --config.data.train_files=../shared/corpora/kernel-docs.txt.gz --config.train.steps=200

Every point is `modern_mini.py` with one part put back to what `bert_mini.py` does:

- `modern`: the recipe as it is.
- `bert_masking`: 15% of tokens, 80% [MASK] / 10% random / 10% kept (instead of 40% always
  [MASK]).
- `bert_model`: post-LN, a learned position table, a plain GELU MLP of 4 x hidden, biases,
  token types (instead of pre-LN, RoPE, GEGLU at 2/3 width, no biases); dropout stays 0.
- `bert_optimizer`: BERT's AdamW (b2 0.999) at 5e-4 with a linear decay (instead of b2 0.98 at
  2e-3 with a trapezoid schedule).
- `bert_recipe`: all of the above, plus BERT's dropout 0.1 and `pairs` data with NSP:
  `bert_mini.py`.

All are evaluated on the same fixed eval set with BERT's eval masking (`eval.mlm`).
"""

from configs import models

import importlib.util
import os


def _modern_mini():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "modern_mini.py")
  spec = importlib.util.spec_from_file_location("modern_mini", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  config = _modern_mini()
  config.train.log_every = 25
  config.train.eval_every = 100
  return config


def get_sweep():
  bert = models.bert("mini", vocab_size=8192)
  bert_model = {f"model.{key}": bert[key] for key in (
      "pre_layer_norm", "first_layer_attention_norm", "type_vocab_size", "position_encoding",
      "mlp_activation", "mlp_dim", "use_bias", "layer_norm_eps")}
  bert_masking = {"objectives.mlm.mask_rate": 0.15, "objectives.mlm.mask_token_prob": 0.8,
                  "objectives.mlm.random_token_prob": 0.1}
  bert_optimizer = {"optimizer.learning_rate": 5e-4, "optimizer.b2": 0.999,
                    "optimizer.decay": "linear", "optimizer.warmup_steps": 100}
  bert_data = {"data.format": "pairs", "objectives.nsp.weight": 1.0,
               "model.dropout_rate": 0.1, "model.attention_dropout_rate": 0.1}
  return [
      {"name": "modern", "overrides": {}},
      {"name": "bert_masking", "overrides": bert_masking},
      {"name": "bert_model", "overrides": bert_model},
      {"name": "bert_optimizer", "overrides": bert_optimizer},
      {"name": "bert_recipe",
       "overrides": {**bert_model, **bert_masking, **bert_optimizer, **bert_data}},
  ]
