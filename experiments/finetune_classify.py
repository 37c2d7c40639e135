"""Sentence (or sentence-pair) classification on top of a pretrained jaxlm run.

  python -m jaxlm.finetune --config=experiments/finetune_classify.py --workdir=runs/cls \
      --config.init_from=runs/tiny --config.data.train_file=train.jsonl \
      --config.data.eval_file=eval.jsonl

BERT's fine-tuning recipe (AdamW, 10% warm-up, linear decay, dropout 0.1) with a learning rate
for the small models this machine trains; BERT-base wants 2e-5 to 5e-5. Add
`--config.lora.rank=8` to train low-rank adapters and the head only.
"""

from configs import finetune


def get_config():
  config = finetune.get_config()
  config.optimizer.learning_rate = 1e-3
  return config
