"""A two-class task made from any corpus: is a sentence in its original word order, or are its
words shuffled? Written as JSONL for `python -m jaxlm.finetune`.

It needs no labelled data and no download, and it measures something pretraining teaches (which
word orders a language allows), so it shows what a pretrained encoder brings to fine-tuning on
the machine at hand. Documents go wholly to train or to eval, so eval sentences are unseen.

  python -m jaxlm.data.word_order_task --output=runs/order [--input=corpus.txt.gz]
"""

import collections
import json
import os
import re
import sys

import numpy as np

from jaxlm.data import setup, text

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_NOT_WORD = re.compile(r"[^\w\s]+")


def plain(sentence: str) -> str:
  """Lower case without punctuation (`--plain`): a capital or a full stop in the middle gives a
  shuffled sentence away without any knowledge of word order, so only the plain task measures
  what pretraining taught (README: a 300-step character-level model has not learnt enough)."""
  return " ".join(_NOT_WORD.sub(" ", sentence).lower().split())


def sentences(paragraphs: list[str], min_words: int, max_words: int,
              make_plain: bool = False) -> list[str]:
  """Sentences of `min_words`..`max_words` words, in reading order (made `plain` if asked)."""
  out = []
  for paragraph in paragraphs:
    for sentence in _SENTENCE_END.split(paragraph):
      sentence = plain(sentence) if make_plain else sentence.strip()
      if min_words <= len(sentence.split()) <= max_words:
        out.append(sentence)
  return out


def shuffled(sentence: str, rng: np.random.Generator) -> str:
  """The sentence's words in a random order that differs from the original."""
  words = sentence.split()
  for _ in range(10):
    order = rng.permutation(len(words))
    if (order != np.arange(len(words))).any() and [words[i] for i in order] != words:
      break
  return " ".join(words[i] for i in order)


def make_task(input_path: str, output: str, *, train_examples: int = 2000,
              eval_examples: int = 500, eval_every: int = 5, min_words: int = 6,
              max_words: int = 20, seed: int = 0, make_plain: bool = False) -> dict[str, str]:
  """Writes `train.jsonl` and `eval.jsonl` (balanced `original` / `shuffled`) into `output`."""
  rng = np.random.default_rng(seed)
  pools = {"train": [], "eval": []}
  documents = text.iter_documents(input_path, counts=collections.Counter())
  for index, document in enumerate(documents):
    pools["eval" if index % eval_every == 0 else "train"] += sentences(
        document, min_words, max_words, make_plain)
  os.makedirs(output, exist_ok=True)
  paths = {}
  for split, size in (("train", train_examples), ("eval", eval_examples)):
    pool = pools[split]
    chosen = rng.choice(len(pool), size=min(size, len(pool)), replace=False)
    paths[split] = os.path.join(output, f"{split}.jsonl")
    with open(paths[split], "w", encoding="utf-8") as f:
      for k, i in enumerate(chosen):
        label = "original" if k % 2 == 0 else "shuffled"
        sentence = pool[i] if label == "original" else shuffled(pool[i], rng)
        f.write(json.dumps({"text": sentence, "label": label}, ensure_ascii=False) + "\n")
  return paths


def main(argv: list[str]) -> None:
  args = dict(a.lstrip("-").split("=", 1) for a in argv[1:] if "=" in a)
  if "output" not in args:
    sys.exit("usage: python -m jaxlm.data.word_order_task --output=DIR [--input=CORPUS] "
             "[--train_examples=2000] [--eval_examples=500] [--plain=1]")
  paths = make_task(args.get("input", setup.default_corpus_path()), args["output"],
                    train_examples=int(args.get("train_examples", 2000)),
                    eval_examples=int(args.get("eval_examples", 500)),
                    make_plain=args.get("plain", "0") not in ("0", "false", "False"))
  print(json.dumps(paths))


if __name__ == "__main__":
  main(sys.argv)
