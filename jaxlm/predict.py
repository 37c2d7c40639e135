"""Fill in masks with a trained run: `python -m jaxlm.predict --workdir=runs/tiny --text="The
[MASK] of the hacker."` prints the top pieces at each `[MASK]`.

`--input=FILE --output=OUT.jsonl` writes one JSON object per line of FILE: `text`, `input_ids`
(the row as fed to the model, `[CLS]`/`[SEP]` included, without its padding) and `predictions`,
`[{"position": index into input_ids, "top": [{"token", "id", "logit", "prob"}, ...]}, ...]`.
A tab or a literal `[SEP]` in a text starts its segment B. The run's own head predicts: MLM
when it has one, else PLM, else CLM, which predicts the piece after the text (and with
`--max_new_tokens=N` continues it greedily). Details: `jaxlm/inference/fill_mask.py`.
"""

import sys

from absl import app, flags, logging

from jaxlm import cli
from jaxlm.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of a training run (`jaxlm.train`).")
_TEXT = flags.DEFINE_string("text", None, "One text with [MASK]s (CLM: a prefix); printed.")
_INPUT = flags.DEFINE_string("input", None, "A UTF-8 text file, one text per line.")
_OUTPUT = flags.DEFINE_string("output", None, "The JSONL file --input's predictions go to.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Pieces listed per prediction.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the newest.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Texts per model call.")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", 0, "CLM only: continue each text greedily by up to this many pieces.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  from jaxlm.inference import fill_mask as fill_mask_lib  # Here: --help stays fast.
  from jaxlm.training import pretrained

  text, source, output = _TEXT.value, _INPUT.value, _OUTPUT.value
  if (text is None) == (source is None) or (output is None) != (source is None):
    raise UserError('Pass either --text="..." or --input=FILE --output=OUT.jsonl.')
  if _MAX_NEW_TOKENS.value < 0:
    raise UserError(f"--max_new_tokens is {_MAX_NEW_TOKENS.value}; use 0 or more.")
  if source is None:
    texts, names = [text], ["--text"]
  else:
    texts = fill_mask_lib.read_texts(source)
    names = [f"line {i} of {source}" for i in range(1, len(texts) + 1)]
    fill_mask_lib.check_output(output)

  run = pretrained.load(_WORKDIR.value, step=_STEP.value)
  predictor = fill_mask_lib.Predictor(run, top_k=_TOP_K.value, batch_size=_BATCH_SIZE.value)
  logging.info("Step %d of %s: predicting with the %s head.", run.step, _WORKDIR.value,
               predictor.head)
  items = predictor(texts, max_new_tokens=_MAX_NEW_TOKENS.value, names=names)
  if output is None:
    print("\n\n".join(fill_mask_lib.format_predictions(item, predictor.head) for item in items))
  else:
    fill_mask_lib.write_jsonl(output, items)
    logging.info("Wrote %d predictions to %s", len(items), output)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  sys.exit(cli.run(main))
