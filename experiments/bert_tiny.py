"""BERT-tiny (L2 H128 A2), MLM + NSP, on the embedded Jargon File corpus.

Learns visibly in about two minutes on 2 CPU cores:

  python -m jaxlm.train --config=experiments/bert_tiny.py --workdir=runs/tiny

Chosen for speed of learning, not for BERT fidelity: a 128-piece (nearly character-level)
vocabulary, pre-LN, no dropout, a short warm-up and a high learning rate. With BERT's 8k-30k
vocabularies a model this small sits on the unigram plateau for hundreds of steps (see
BUILD_NOTES.md); `bert_mini.py` and `bert_base.py` follow the original recipe.
"""

from configs import recipes


def get_config():
  return recipes.tiny_fast()
