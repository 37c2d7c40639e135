"""Prepare a corpus once: `python -m jaxlm.prepare --input=GLOB[,GLOB...] --output=DIR`.

Trains a sentencepiece tokenizer on a bounded sample (or takes `--tokenizer`), tokenizes the
text with `--num_workers` processes into shards that keep document and sentence boundaries,
splits train/eval by a hash of each document, and writes `DIR/stats.json` and a manifest. Train
on the result with `--config.data.train_files=DIR`.
"""

import os
import sys

from absl import flags

from jaxlm import cli

_INPUT = flags.DEFINE_string("input", None, "Comma-separated paths or globs: .txt, .txt.gz, "
                             ".jsonl, .jsonl.gz.")
_OUTPUT = flags.DEFINE_string("output", None, "The prepared folder to write.")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "Pieces of the tokenizer to train.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "An existing jaxlm sentencepiece model to use "
                                 "instead of training one.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "Tokenizer kind.")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.01, "Share of documents held out for eval.")
_WORKERS = flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                                "Tokenizing processes (0 = this process).")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "The text's key in .jsonl records.")
_SAMPLE = flags.DEFINE_integer("sample_sentences", 1_000_000,
                               "At most this many sentences train the tokenizer.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "Replace a folder prepared from other inputs or options.")


def main(argv):
  del argv
  from jaxlm.data import prepare

  manifest = prepare.prepare(prepare.PrepareOptions(
      inputs=_INPUT.value, output=_OUTPUT.value, vocab_size=_VOCAB.value,
      tokenizer=_TOKENIZER.value, model_type=_MODEL_TYPE.value,
      eval_fraction=_EVAL_FRACTION.value, num_workers=_WORKERS.value,
      text_field=_TEXT_FIELD.value, sample_sentences=_SAMPLE.value, overwrite=_OVERWRITE.value))
  splits = manifest["splits"]
  print(f"Prepared {_OUTPUT.value}: " + ", ".join(
      f"{name} {s['documents']:,} documents / {s['tokens']:,} tokens" for name, s in splits.items())
      + f"; fingerprint {manifest['fingerprint']}. Details: {_OUTPUT.value}/stats.json")


if __name__ == "__main__":
  flags.mark_flags_as_required(["input", "output"])
  sys.exit(cli.run(main))
