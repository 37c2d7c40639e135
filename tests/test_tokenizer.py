"""The sentencepiece tokenizer: fixed special ids, round trips, refusal of foreign models."""

import io
import re

import numpy as np
import pytest
import sentencepiece as spm

from jaxlm.data import tokenizer as tokenizer_lib
from conftest import sentences_of
from jaxlm.data.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, UNK_ID
from jaxlm.errors import UserError

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A hacker is a person who enjoys exploring the details of programmable systems.",
    "In 1975, the file had 42 entries; by now it has many more (and some jokes).",
]


def test_special_pieces_sit_at_fixed_ids(tokenizer):
  want = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[MASK]": MASK_ID}
  assert {piece: i for i, piece in enumerate(map(tokenizer.id_to_piece, range(5)))} == want
  assert (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID) == (0, 1, 2, 3, 4)
  assert tokenizer.vocab_size == 512


def test_ordinary_text_never_yields_control_ids(tokenizer, corpus_documents):
  sentences = sentences_of(corpus_documents[:20])
  ids = np.concatenate([np.asarray(x) for x in tokenizer.encode_batch(sentences + TEXT) if x])
  assert ids.size > 1000
  assert not np.isin(ids, [PAD_ID, CLS_ID, SEP_ID, MASK_ID]).any()
  assert ids.max() < tokenizer.vocab_size


def test_literal_special_token_text_stays_text(tokenizer):
  for text in ("[MASK]", "see [MASK] and [CLS] then [SEP] or [PAD]"):
    ids = tokenizer.encode(text)
    assert ids, text
    assert not {PAD_ID, CLS_ID, SEP_ID, MASK_ID} & set(ids), (text, ids)


@pytest.mark.parametrize("text", TEXT)
def test_decode_inverts_encode(tokenizer, text):
  ids = tokenizer.encode(text)
  assert UNK_ID not in ids  # Otherwise the round trip is not expected to hold.
  assert tokenizer.decode(ids) == text


def test_decode_drops_special_ids(tokenizer):
  ids = tokenizer.encode(TEXT[0])
  assert tokenizer.decode([CLS_ID] + ids + [SEP_ID, PAD_ID, PAD_ID]) == TEXT[0]


def test_word_start_marks_pieces_that_begin_words(tokenizer):
  pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
  table = tokenizer.word_start
  assert table.shape == (tokenizer.vocab_size,) and table.dtype == bool
  assert table[:NUM_SPECIAL].all()
  starts = [i for i, p in enumerate(pieces) if p.startswith("\u2581")]
  inner = [i for i, p in enumerate(pieces[NUM_SPECIAL:], NUM_SPECIAL) if p[:1].isalnum()]
  assert len(starts) > 50 and len(inner) > 50
  assert table[starts].all()
  assert not table[inner].any()


def test_word_start_agrees_with_encoded_words(tokenizer):
  """Each space-separated word of the text begins with exactly one word-start piece."""
  text = "hackers write programs and documentation"
  ids = tokenizer.encode(text)
  assert int(tokenizer.word_start[ids].sum()) == len(text.split())
  assert tokenizer.word_start[ids[0]]


def _sentencepiece_defaults_model(path, corpus_documents, **overrides):
  lines = sentences_of(corpus_documents[:30])
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model,
                                 vocab_size=200, minloglevel=2, **overrides)
  path.write_bytes(model.getvalue())
  return str(path)


@pytest.mark.parametrize(
    "overrides, first_wrong, want_id",
    [
        ({}, "[PAD]", 0),  # sentencepiece defaults: unk 0, bos 1, eos 2, pad -1.
        (dict(pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=2, eos_id=3),
         "[CLS]", 2),
    ],
)
def test_foreign_model_is_refused_with_true_message(tmp_path, corpus_documents, overrides,
                                                     first_wrong, want_id):
  path = _sentencepiece_defaults_model(tmp_path / "foreign.model", corpus_documents, **overrides)
  with pytest.raises(UserError) as raised:
    tokenizer_lib.Tokenizer(path)
  message = str(raised.value)
  assert path in message
  assert f"'{first_wrong}'" in message and f"id {want_id}" in message
  # Every "'piece' at id N" the message claims about the model must be true of it.
  sp = spm.SentencePieceProcessor(model_file=path)
  for piece, i in re.findall(r"'([^']+)' at id (-?\d+)", message):
    assert sp.IdToPiece(int(i)) == piece, (
        f"the message says the model has {piece!r} at id {i}, but id {i} is "
        f"{sp.IdToPiece(int(i))!r}: {message}")


def test_missing_model_names_the_path(tmp_path):
  path = str(tmp_path / "no" / "such.model")
  with pytest.raises(UserError, match=re.escape(path)):
    tokenizer_lib.Tokenizer(path)


def test_garbage_file_is_refused(tmp_path):
  path = tmp_path / "garbage.model"
  path.write_bytes(b"this is not a sentencepiece model\n" * 10)
  with pytest.raises(UserError, match="not a sentencepiece model"):
    tokenizer_lib.Tokenizer(str(path))


def test_unknown_model_type_is_refused(tmp_path):
  with pytest.raises(UserError, match="wordpiece"):
    tokenizer_lib.train(["a b c"], str(tmp_path / "t.model"), vocab_size=10,
                        model_type="wordpiece")
  assert not (tmp_path / "t.model").exists()


def test_training_gives_one_tokenizer_on_any_machine(tmp_path, corpus_documents):
  """The same lines give the same pieces and scores in a fresh process with another core count.

  sentencepiece's scores once followed the thread count (os.cpu_count()) and its own sentence
  shuffle followed process state, so CI's machine trained another tokenizer than this one."""
  import subprocess
  import sys

  lines_path = tmp_path / "lines.txt"
  lines = sentences_of(corpus_documents)[:1500]
  lines_path.write_text("\n".join(lines), encoding="utf-8")
  here = tokenizer_lib.train(lines, str(tmp_path / "here.model"), vocab_size=300,
                             max_sentences=1000)
  script = (
      "import os, sys; os.cpu_count = lambda: 7\n"
      "from jaxlm.data import tokenizer\n"
      "lines = open(sys.argv[1], encoding='utf-8').read().split('\\n')\n"
      "tokenizer.train(lines, sys.argv[2], vocab_size=300, max_sentences=1000)\n")
  subprocess.run([sys.executable, "-c", script, str(lines_path), str(tmp_path / "there.model")],
                 check=True)
  there = spm.SentencePieceProcessor(model_file=str(tmp_path / "there.model"))
  ours = here._sp
  assert ours.GetPieceSize() == there.GetPieceSize()
  assert [(ours.IdToPiece(i), ours.GetScore(i)) for i in range(ours.GetPieceSize())] == [
      (there.IdToPiece(i), there.GetScore(i)) for i in range(there.GetPieceSize())]
