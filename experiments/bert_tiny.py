"""BERT-tiny (L2 H128 A2), MLM + NSP, on the embedded Jargon File corpus.

Learns visibly in about two minutes on 2 CPU cores:

  python -m jaxlm.train --config=experiments/bert_tiny.py --workdir=runs/tiny

Chosen for speed of learning, not for BERT fidelity: a 128-piece (nearly character-level)
vocabulary, pre-LN, no dropout, a short warm-up and a high learning rate. With BERT's 8k-30k
vocabularies a model this small sits on the unigram plateau for hundreds of steps (see
BUILD_NOTES.md); `bert_mini.py` and `bert_base.py` follow the original recipe.
"""

from configs import base, models, optimizers


def get_config():
  config = base.get_config()
  config.model = models.bert("tiny", vocab_size=128)
  config.model.max_position = 128
  config.model.pre_layer_norm = True
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0
  config.data.seq_len = 64
  config.data.batch_size = 128
  config.objectives.mlm.max_predictions_per_seq = 10
  config.optimizer = optimizers.adamw_fast(learning_rate=3e-3, warmup_steps=20)
  config.train.steps = 300
  config.train.log_every = 10
  config.train.eval_every = 100
  config.data.eval_examples = 512
  config.train.checkpoint_every = 100
  return config
