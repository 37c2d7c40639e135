"""jaxlm's sentencepiece tokenizer as a Hugging Face fast tokenizer, and back.

`export_tokenizer` writes `tokenizer.json` (a `tokenizers` pipeline), `tokenizer_config.json`,
`special_tokens_map.json` and the original `tokenizer.model`, so that
`transformers.AutoTokenizer.from_pretrained(DIR)` gives the ids jaxlm gives, for any text:

- the text is repaired as `python -m jaxlm.prepare` repairs it (`data/text.py`: NUL removed, the
  other C0 controls but tab become spaces), then normalised and segmented by the sentencepiece
  model's own rules (its NFKC charsmap, extra spaces removed, a "▁" prefix; unigram or BPE);
- one text is `[CLS] A [SEP]`, a pair `[CLS] A [SEP] B [SEP]` with token types 0 up to and
  including the first [SEP], 1 after it, as jaxlm's `pairs` format builds them.

The special pieces ([PAD] [UNK] [CLS] [SEP] [MASK], ids 0-4) are sentencepiece control symbols,
never produced from raw text: a literal "[MASK]" in a text is text. The exported tokenizer keeps
that (`split_special_tokens=True`); pass `split_special_tokens=False` to a call to have literal
special tokens recognised (a fill-mask prompt).

`jaxlm_ids` is the reference the exported tokenizer is checked against.

One known difference, from `tokenizers` itself: its `Precompiled` normaliser looks a grapheme
cluster (a character and the combining marks after it) up only as far as its first mapped
character. When a character that NFKC rewrites (a ligature such as "ﬁ", a no-break or full-width
space, a full-width letter) is directly followed by a combining mark, the mark can be dropped or
left uncomposed there, and the ids differ. Accents, precomposed or decomposed, on ordinary
letters and every text of the kind jaxlm trains on are unaffected.
"""

import json
import os
import shutil

from jaxlm.data import text as text_lib, tokenizer as tokenizer_lib
from jaxlm.errors import UserError

MODEL_FILE = "tokenizer.model"  # The sentencepiece model, saved beside the fast tokenizer.
_INPUTS = ("input_ids", "token_type_ids", "attention_mask")
_SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
            "sep_token": "[SEP]", "mask_token": "[MASK]"}
# Score given to the control pieces in the exported unigram model. sentencepiece never matches a
# control piece against text; the `tokenizers` unigram model knows no piece types, so the pieces
# get a score that loses to any spelling of the same characters with ordinary pieces.
_CONTROL_SCORE = -1e9
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4  # sentencepiece's piece types.


def jaxlm_ids(tokenizer: tokenizer_lib.Tokenizer, text: str, pair: str | None = None) -> list[int]:
  """The ids jaxlm's data pipeline gives one text (or a pair), special tokens included."""
  def encode(s):
    return tokenizer.encode(text_lib._repair(s, set()))  # As prepare repairs every line.

  ids = [tokenizer_lib.CLS_ID, *encode(text), tokenizer_lib.SEP_ID]
  if pair is not None:
    ids += [*encode(pair), tokenizer_lib.SEP_ID]
  return ids


def _proto(path: str):
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return proto


def fast_tokenizer(model_path: str):
  """A `tokenizers.Tokenizer` that encodes like jaxlm (see the module docstring)."""
  from tokenizers import Regex, normalizers, processors
  from transformers.convert_slow_tokenizer import SpmConverter

  proto = _proto(model_path)
  if proto.trainer_spec.byte_fallback:
    raise UserError(f"'{model_path}' uses byte fallback, which jaxlm never trains: it cannot be "
                    "exported. Export a run whose tokenizer jaxlm trained.")
  special = {p.piece for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)}
  if proto.trainer_spec.model_type == 1:  # Unigram.
    vocab = [(p.piece, _CONTROL_SCORE if p.piece in special else p.score) for p in proto.pieces]
  elif proto.trainer_spec.model_type == 2:  # BPE: merges come from the normal pieces only.
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  else:
    raise UserError(f"'{model_path}' is neither a unigram nor a BPE sentencepiece model.")
  # transformers' converter follows the model's normaliser spec; legacy=True puts the "▁" prefix
  # on every text as sentencepiece does.
  fast = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
  repair = [normalizers.Replace("\x00", ""),
            normalizers.Replace(Regex("[\x01-\x08\x0a-\x1f]"), " ")]
  fast.normalizer = normalizers.Sequence(repair + [fast.normalizer])
  # jaxlm's rows: [CLS] A [SEP] (B [SEP]), token type 1 from B on (formats/pairs.py).
  fast.post_processor = processors.TemplateProcessing(
      single="[CLS]:0 $A:0 [SEP]:0",
      pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
      special_tokens=[("[CLS]", tokenizer_lib.CLS_ID), ("[SEP]", tokenizer_lib.SEP_ID)],
  )
  return fast, _unmatchable_controls(proto, special)


def _unmatchable_controls(proto, special: set[str]) -> list[str]:
  """Special pieces holding a character that has no piece of its own: a unigram model may then
  read that literal text as the special piece where sentencepiece reads [UNK]s."""
  if proto.trainer_spec.model_type != 1:
    return []
  singles = {p.piece for p in proto.pieces
             if p.type in (_NORMAL, _USER_DEFINED) and len(p.piece) == 1}
  return sorted(s for s in special if any(ch not in singles for ch in s))


def export_tokenizer(tokenizer: tokenizer_lib.Tokenizer, directory: str,
                     model_max_length: int, token_types: bool = True) -> list[str]:
  """Writes the Hugging Face tokenizer files and the sentencepiece model into `directory`.

  `token_types=False` (a model without a token-type table, as ModernBert): calls return no
  `token_type_ids`, as ModernBERT's own tokenizer, since the model has nothing to read them with.
  Returns warnings (none for a tokenizer trained on text holding the letters of its special
  pieces).
  """
  from transformers import PreTrainedTokenizerFast

  fast, unmatched = fast_tokenizer(tokenizer.path)
  inputs = [name for name in _INPUTS if token_types or name != "token_type_ids"]
  hf = PreTrainedTokenizerFast(tokenizer_object=fast, model_max_length=model_max_length,
                               split_special_tokens=True, model_input_names=inputs, **_SPECIAL)
  hf.save_pretrained(directory)
  # The class name transformers 4.x knows too (5.x reads it as its `TokenizersBackend`).
  config_path = os.path.join(directory, "tokenizer_config.json")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  config["tokenizer_class"] = "PreTrainedTokenizerFast"
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(_SPECIAL, f, indent=2)  # Read by older transformers and other tools.
  shutil.copyfile(tokenizer.path, os.path.join(directory, MODEL_FILE))
  if not unmatched:
    return []
  return [f"The tokenizer has no piece for some characters of {unmatched}: a text holding them "
          "literally may get the special id from the Hugging Face tokenizer and [UNK]s from "
          "jaxlm."]


def import_tokenizer(directory: str) -> str | None:
  """The path of the sentencepiece model saved in an export folder, None if it has none."""
  path = os.path.join(directory, MODEL_FILE)
  if not os.path.isfile(path):
    return None
  tokenizer_lib.Tokenizer(path)  # Checks the special ids; a UserError names the problem.
  return path
