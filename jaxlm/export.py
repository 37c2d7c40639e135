"""Export a trained run to Hugging Face:
`python -m jaxlm.export --workdir=runs/tiny --output=hf/tiny`.

Writes the model (`model.safetensors`, `config.json`: a BERT for post-LN runs, a
RoBERTa-PreLayerNorm for pre-LN ones, a ModernBert for rotary-position ones, see
`jaxlm/hf/convert.py`), the tokenizer (`tokenizer.json` and friends, plus the sentencepiece
`tokenizer.model`; without token types for a model that has no token-type table),
`jaxlm_export.json` (the step, the run's config, where each head went) and a short README.md.
`--step` picks a checkpoint (default: the newest); a non-empty `--output` is refused unless
`--overwrite`. Needs the `hf` extra:
`pip install torch==2.13.0 && pip install -e '.[hf]'`.
"""

import json
import os
import shutil
import sys
import tempfile

from absl import app, flags, logging

from jaxlm import cli
from jaxlm.errors import UserError
from jaxlm.hf import convert, tokenizer as hf_tokenizer

_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the jaxlm training run to export.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the Hugging Face model into.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export; default: the newest.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output.")

METADATA_FILE = "jaxlm_export.json"
_INSTALL = "pip install torch==2.13.0 && pip install -e '.[hf]'"


def _check_output(output: str, overwrite: bool) -> None:
  if os.path.exists(output) and not os.path.isdir(output):
    raise UserError(f"--output {output} is a file; give a folder.")
  if os.path.isdir(output) and os.listdir(output) and not overwrite:
    raise UserError(f"--output {output} is not empty; pass --overwrite to replace its contents, "
                    "or choose another folder.")


def _check_libraries() -> None:
  try:
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    raise UserError(f"Exporting needs the hf extra ({e.name} is missing): {_INSTALL}.") from None


def write_export(directory: str, pretrained, workdir: str = "") -> dict:
  """Writes the export of a loaded run (`jaxlm.training.pretrained.Pretrained`) into the empty
  or new `directory`; returns the metadata written to METADATA_FILE."""
  import jax

  c = pretrained.model_config
  convert.check_exportable(c)  # Before anything is written.
  params = jax.device_get(pretrained.params)
  os.makedirs(directory, exist_ok=True)
  exported = convert.save_hf(directory, params, c)
  warnings = hf_tokenizer.export_tokenizer(pretrained.tokenizer, directory, c.max_position,
                                           token_types=c.type_vocab_size > 0)
  for warning in warnings:
    logging.warning("%s", warning)
  metadata = {
      "jaxlm_step": int(pretrained.step),
      "workdir": os.path.abspath(workdir) if workdir else "",
      "architecture": exported.architecture,
      "lm_head": exported.lm_head,
      "objectives": [o.name for o in pretrained.objectives],
      # jaxlm weights the architecture has no place for, kept for `jaxlm.hf.import_hf`.
      "extra_weights": sorted(exported.extra),
      "tokenizer_warnings": warnings,
      "config": json.loads(pretrained.config.to_json_best_effort()),
  }
  with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as f:
    json.dump(metadata, f, indent=2, sort_keys=True)
  with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
    f.write(_readme(metadata))
  return metadata


def _readme(metadata: dict) -> str:
  extra = ", ".join(metadata["extra_weights"]) or "none"
  return f"""# {metadata["architecture"]} exported from jaxlm

Pretrained with jaxlm (objectives: {", ".join(metadata["objectives"])}), checkpoint step
{metadata["jaxlm_step"]}; the run's full config is in `{METADATA_FILE}`.

```python
from transformers import AutoTokenizer, {metadata["architecture"]}
tokenizer = AutoTokenizer.from_pretrained(PATH)
model = {metadata["architecture"]}.from_pretrained(PATH)
```

The tokenizer gives the ids jaxlm gives, special tokens included; a literal "[MASK]" in a text is
text, as in jaxlm (call it with `split_special_tokens=False` for fill-mask prompts).
`tokenizer.model` is the original sentencepiece model. Weights transformers does not read
(`{convert.EXTRA_FILE}`): {extra}.
"""


def export_run(workdir: str, output: str, step: int | None = None,
               overwrite: bool = False) -> dict:
  """Loads the run in `workdir` and writes its export to `output` (see the module docstring).

  The export is written into a temporary folder beside `output` and moved into place at the
  end, so a failure leaves `output` as it was.
  """
  _check_output(output, overwrite)
  _check_libraries()
  from jaxlm.models import ModelConfig
  from jaxlm.training import pretrained as pretrained_lib

  # A model no Hugging Face architecture computes is refused before its checkpoint is read.
  convert.check_exportable(ModelConfig.from_config(pretrained_lib.read_config(workdir).model))
  pretrained = pretrained_lib.load(workdir, step=step)
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".export.tmp-", dir=parent)
  try:
    metadata = write_export(staging, pretrained, workdir)
    for name in os.listdir(staging):  # Temporary files are private; an export is shared.
      os.chmod(os.path.join(staging, name), 0o644)
    os.chmod(staging, 0o755)
    if os.path.isdir(output):
      shutil.rmtree(output)
    os.replace(staging, output)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("Exported step %d of %s as %s into %s.", metadata["jaxlm_step"], workdir,
               metadata["architecture"], output)
  return metadata


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  metadata = export_run(_WORKDIR.value, _OUTPUT.value, _STEP.value, _OVERWRITE.value)
  print(f"Wrote {metadata['architecture']} (step {metadata['jaxlm_step']}) to {_OUTPUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "output"])
  sys.exit(cli.run(main))
