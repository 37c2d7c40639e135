"""A tiny causal LM (CLM) on packed windows of the embedded corpus: the GPT-style baseline.

  python -m jaxlm.train --config=experiments/gpt_tiny.py --workdir=runs/gpt_tiny

BERT-tiny's size and recipe (`bert_tiny.py`: 128-piece vocabulary, pre-LN, no dropout, seq 64)
with causal attention and next-token prediction at every position of `packed` windows
(documents joined by [SEP]), so it learns visibly in about two minutes on 2 CPU cores.
"""

from configs import recipes


def get_config():
  config = recipes.tiny_fast()
  config.data.format = "packed"
  config.objectives.mlm.weight = 0.0
  config.objectives.nsp.weight = 0.0
  config.objectives.clm.weight = 1.0
  return config
