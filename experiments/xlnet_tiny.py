"""A tiny XLNet: permuted LM with two-stream attention alone, on the embedded corpus.

  python -m jaxlm.train --config=experiments/xlnet_tiny.py --workdir=runs/xlnet_tiny

BERT-tiny's size and fast recipe (`recipes.tiny_fast`: 128-piece vocabulary, pre-LN, no
dropout, seq 64), trained on `full_sentences` windows with XLNet's objective: predict the last
1/6 of a random factorisation order from the query stream. Learns visibly in about two minutes on
2 CPU cores.
"""

from configs import recipes


def get_config():
  config = recipes.tiny_fast()
  config.data.format = "full_sentences"
  config.objectives.mlm.weight = 0.0
  config.objectives.nsp.weight = 0.0
  config.objectives.plm.weight = 1.0
  config.model.position_encoding = "relative"
  return config
