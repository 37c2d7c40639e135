"""RoBERTa's recipe at tiny size: MLM alone on `full_sentences` (no NSP), the embedded corpus.

  python -m jaxlm.train --config=experiments/roberta_tiny.py --workdir=runs/roberta_tiny

The tiny recipe of `bert_tiny.py` (`configs/recipes.py`) with RoBERTa's data choices: inputs of
contiguous full sentences across documents and no next-sentence prediction. Its eval MLM numbers
are measured on the same fixed eval set as `bert_tiny.py`'s, so the two compare directly.
"""

from configs import recipes


def get_config():
  config = recipes.tiny_fast()
  config.data.format = "full_sentences"
  config.objectives.nsp.weight = 0.0
  return config
