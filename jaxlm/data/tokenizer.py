"""The sentencepiece tokenizer: trained by jaxlm, with BERT's special tokens at fixed ids.

sentencepiece's own defaults (pad -1, bos 1, eos 2) do not fit an encoder: a pad id of -1 makes
`jnp.take` read the last embedding row. Every special id is therefore set explicitly and checked
when a model is loaded.
"""

import io
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from jaxlm.errors import UserError

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_PIECES = {
    "[PAD]": PAD_ID, "[UNK]": UNK_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[MASK]": MASK_ID}
NUM_SPECIAL = len(SPECIAL_PIECES)
MODEL_TYPES = ("unigram", "bpe")
_WORD_START = "\u2581"  # sentencepiece's "▁", which marks a piece that begins a word.
# sentencepiece splits its EM sums over its threads, so the thread count changes the scores (and
# at times the pieces). A fixed count, not the machine's cores, gives every machine one tokenizer.
_TRAINER_THREADS = 16


def train(
    lines: Iterable[str],
    path: str,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    max_sentences: int = 2_000_000,
    seed_sentences: int = 1_000_000,
) -> "Tokenizer":
  """Trains a model on `lines` and writes it to `path` atomically (a killed run leaves none)."""
  if model_type not in MODEL_TYPES:
    raise UserError(f"Unknown tokenizer type '{model_type}': use one of {MODEL_TYPES}.")
  model = io.BytesIO()
  try:
    _train_into(model, lines, vocab_size, model_type, max_sentences, seed_sentences)
  except RuntimeError as e:
    raise UserError(
        f"Training a {vocab_size}-piece {model_type} tokenizer failed: {str(e).splitlines()[-1]} "
        "Choose another data.tokenizer_vocab_size / model.vocab_size (it must hold every "
        "character of the corpus plus the 5 special pieces, and not exceed what the corpus "
        "supports)."
    ) from None
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=directory, delete=False, prefix=".tokenizer.tmp-") as f:
    f.write(model.getvalue())
  os.chmod(f.name, 0o644)  # NamedTemporaryFile makes it private; a model is shared.
  os.replace(f.name, path)
  return Tokenizer(path)


def _train_into(model, lines, vocab_size, model_type, max_sentences, seed_sentences) -> None:
  """Trains deterministically: the same lines give the same model on any machine. Past
  `max_sentences` the first lines are kept: sentencepiece's own shuffle is seeded by process
  state, not by `set_random_generator_seed`, so callers sample beforehand (prepare.py does)."""
  spm.set_random_generator_seed(0)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      pad_id=PAD_ID,
      pad_piece="[PAD]",
      unk_id=UNK_ID,
      unk_piece="[UNK]",
      bos_id=-1,
      eos_id=-1,
      # Control symbols get fixed ids after pad/unk and are never produced from raw text, so a
      # literal "[MASK]" in a document stays text.
      control_symbols=["[CLS]", "[SEP]", "[MASK]"],
      hard_vocab_limit=False,
      character_coverage=0.9995,
      input_sentence_size=max_sentences,
      seed_sentencepiece_size=seed_sentences,
      shuffle_input_sentence=False,
      num_threads=_TRAINER_THREADS,
      minloglevel=2,
  )


class Tokenizer:
  """Encodes text to ids and back; knows which pieces start a word (for whole-word masking)."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise UserError(
          f"Tokenizer model not found: '{path}'. Set data.tokenizer to a sentencepiece .model "
          "file, or leave it empty to train one from the training files."
      )
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise UserError(f"'{path}' is not a sentencepiece model ({e}).") from None
    for piece, want in SPECIAL_PIECES.items():
      if want < self.vocab_size and self._sp.IdToPiece(want) == piece:
        continue
      found = self._sp.PieceToId(piece)
      where = (f"at id {found}" if self._sp.IdToPiece(found) == piece else "nowhere")
      at_want = self._sp.IdToPiece(want) if want < self.vocab_size else "nothing"
      raise UserError(
          f"Tokenizer '{path}' has '{piece}' {where} and '{at_want}' at id {want}, but jaxlm "
          "needs [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4. Train it with jaxlm (leave "
          "data.tokenizer empty) so every special id is fixed."
      )
    pieces = [self._sp.IdToPiece(i) for i in range(self.vocab_size)]
    self.word_start = np.array([_starts_word(p) for p in pieces], dtype=bool)
    self.word_start[:NUM_SPECIAL] = True

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  def encode(self, text: str) -> list[int]:
    return self._sp.EncodeAsIds(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.Encode(list(texts), out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids if int(i) >= NUM_SPECIAL])

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))


def _starts_word(piece: str) -> bool:
  """A piece starts a word if it carries "▁" or is punctuation (never a word's inner part)."""
  return piece.startswith(_WORD_START) or not piece[:1].isalnum()
