"""Fill in masks with a pretrained run's own head: MLM, XLNet's PLM, or a causal LM's next piece.

Which head predicts (`prediction_head`): MLM when the run trained it (also beside PLM or CLM:
it reads the text on both sides of every mask in one pass), else PLM, else CLM.

How a text becomes a row (`Predictor.encode`), as the run's data format builds its rows:
- `[MASK]` in the text is the mask piece (sentencepiece never makes it from raw text, so the text
  is split at each literal `[MASK]`; every stretch between masks is encoded on its own, as if it
  began a word: write masks between spaces). A tab or a literal `[SEP]` splits the text into
  segments A and B; no other special piece is syntax.
- The row is `[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` (a `packed` run, which never saw `[CLS]`,
  starts it with the `[SEP]` that precedes a document in its stream instead). B has token type 1
  when the run trained on `pairs`, the one format with a segment B; otherwise the two are joined
  as consecutive documents (type 0). For CLM the text is a prefix: no closing `[SEP]`.
- Rows are padded with `[PAD]` to `data.seq_len`, so one compile serves every batch. A longer text
  is an error naming it (truncating it could drop its masks or the prefix it continues).

What each head predicts:
- MLM: the bidirectional pass over the row, the MLM head at every mask.
- PLM: every mask is a target (`plm_perm`: the non-targets by position, then the weight-0
  fillers the static target section needs, padding first as in training, then the masks) and
  its query stream predicts it without its own content. The masks' content is fed as `[PAD]`,
  which neither stream attends to, so no mask sees another either: each is predicted from the
  unmasked text alone, as the first target of a factorisation order is, and the result does not
  depend on the masks' order. At most `num_target_slots(seq_len, partial_prediction)` masks.
- CLM: the next piece after the text (the position is its last piece); `max_new_tokens` adds a
  greedy continuation that ends at `[SEP]` (end of document), sliding the window past seq_len.

Each prediction is the top k of the tokenizer's pieces (a model with more vocabulary rows than
the tokenizer has pieces ignores the extra rows), with its logit and its probability under the
softmax over all those pieces.
"""

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data.permutation import num_target_slots
from jaxlm.data.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID
from jaxlm.errors import UserError
from jaxlm.parallel import rules as rules_lib

MASK_TEXT, SEP_TEXT = "[MASK]", "[SEP]"
MLM, PLM, CLM = "mlm", "plm", "clm"
HEADS = (MLM, PLM, CLM)  # In order of preference when a run trained several.


def prediction_head(objective_names: Sequence[str]) -> str:
  """The head that fills in masks for a run with these objectives."""
  for name in HEADS:
    if name in objective_names:
      return name
  raise UserError(f"This run trains {sorted(objective_names)}, none of which predicts pieces: "
                  f"prediction needs a run with one of {list(HEADS)}.")


@dataclasses.dataclass(frozen=True)
class Row:
  """One text as the model reads it: padded to seq_len, with where to predict."""

  input_ids: np.ndarray  # [seq_len] int32, `[PAD]` after the first `length`.
  token_type_ids: np.ndarray  # [seq_len] int32.
  length: int  # Pieces before the padding.
  positions: tuple[int, ...]  # Indices into input_ids where a prediction is made, ascending.


def top_predictions(params, batch, positions_BP, *, model: nn.Module, head: str, top_k: int,
                    num_pieces: int):
  """The top k pieces at each prediction slot: `(logits [B, P, k], ids [B, P, k], log-sum-exp
  [B, P])`, over the first `num_pieces` vocabulary rows. MLM's head already reads
  `batch['mlm_positions']` and PLM's the target slots; CLM's covers every position and is
  gathered at `positions_BP`."""
  logits = model.apply({"params": params}, batch, deterministic=True)[head]
  if head == CLM:
    logits = jnp.take_along_axis(logits, positions_BP[..., None], axis=1)
  logits = logits[..., :num_pieces]
  top_logits, top_ids = jax.lax.top_k(logits, top_k)
  return top_logits, top_ids, jax.nn.logsumexp(logits, axis=-1)


def plm_order(ids_L: np.ndarray, targets: Sequence[int], num_slots: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """`(plm_perm [L], plm_target_weights [P])` making `targets` (ascending) the last slots.

  The target section has `num_slots` slots; the ones the targets leave free hold fillers
  (weight 0), chosen as `data.permutation` does: padding first (no key to anyone anyway), then
  special pieces, then text, the first positions of each kind.
  """
  length, count = len(ids_L), len(targets)
  is_target = np.zeros(length, bool)
  is_target[list(targets)] = True
  position = np.arange(length)
  kinds = (ids_L == PAD_ID, (ids_L != PAD_ID) & (ids_L < NUM_SPECIAL), ids_L >= NUM_SPECIAL)
  candidates = np.concatenate([position[kind & ~is_target] for kind in kinds])
  fillers = np.sort(candidates[:num_slots - count])
  rest = np.ones(length, bool)
  rest[fillers] = False
  rest[list(targets)] = False
  perm = np.concatenate([position[rest], fillers, np.asarray(targets, np.int64)])
  weights = (np.arange(num_slots) >= num_slots - count).astype(np.float32)
  return perm.astype(np.int32), weights


class Predictor:
  """Fill-mask (or next-piece) predictions of one loaded run, compiled once for fixed shapes
  `[batch_size, seq_len]` and `top_k`.

  `pretrained` is a `jaxlm.training.pretrained.Pretrained`. `batch_size` is rounded up to a
  multiple of the data-parallel devices (`mesh.data x mesh.fsdp`).
  """

  def __init__(self, pretrained, *, top_k: int = 5, batch_size: int = 8):
    p = pretrained
    if top_k < 1 or batch_size < 1:
      raise UserError(f"top_k ({top_k}) and batch_size ({batch_size}) must be at least 1.")
    self.pretrained = p
    self.tokenizer = p.tokenizer
    self.head = prediction_head([o.name for o in p.objectives])
    self.seq_len = int(p.config.data.seq_len)
    self.num_pieces = min(p.tokenizer.vocab_size, p.model_config.vocab_size)
    if top_k > self.num_pieces:
      raise UserError(f"top_k is {top_k}, but the tokenizer has only {self.num_pieces} pieces.")
    self.top_k = top_k
    data_format = p.config.data.format
    self._start_id = SEP_ID if data_format == "packed" else CLS_ID
    self._type_b = 1 if data_format == "pairs" else 0
    if self.head == MLM:
      self.num_slots = self.seq_len
    elif self.head == PLM:
      plm = next(o for o in p.objectives if o.name == PLM)
      self.num_slots = num_target_slots(self.seq_len, plm.permutation.partial_prediction)
    else:
      self.num_slots = 1
    ways = p.mesh.shape["data"] * p.mesh.shape["fsdp"]
    self.batch_size = -(-batch_size // ways) * ways
    model = p.model.clone(heads=tuple((n, h) for n, h in p.model.heads if n == self.head))
    batch_sharding = rules_lib.batch_sharding(p.mesh, p.rules)
    self._batch_sharding = batch_sharding
    self._forward = jax.jit(
        functools.partial(top_predictions, model=model, head=self.head, top_k=top_k,
                          num_pieces=self.num_pieces),
        in_shardings=(jax.tree_util.tree_map(lambda x: x.sharding, p.params), batch_sharding,
                      batch_sharding),
        out_shardings=rules_lib.replicated(p.mesh))

  # Texts to rows.

  def segments(self, text: str, where: str) -> list[list[int]]:
    """The pieces of segment A (and B), with MASK_ID at each `[MASK]`."""
    parts = text.replace("\t", f" {SEP_TEXT} ").split(SEP_TEXT)
    if len(parts) > 2:
      raise UserError(f"{where} has {len(parts)} segments; a text has at most two (A and B), "
                      f"split by one tab or one {SEP_TEXT}.")
    segments = []
    for part in parts:
      ids = []
      for i, stretch in enumerate(part.split(MASK_TEXT)):
        if i:
          ids.append(MASK_ID)
        if stretch.strip():
          ids.extend(self.tokenizer.encode(stretch.strip()))
      segments.append(ids)
    if not any(segments):
      raise UserError(f"{where} has no pieces: {text!r}.")
    if len(segments) == 2 and not all(segments):
      raise UserError(f"{where} has an empty segment {'A' if not segments[0] else 'B'} around "
                      f"its tab or {SEP_TEXT}.")
    return segments

  def encode(self, text: str, where: str = "the text") -> Row:
    """The row the model reads for `text`; `where` names it in errors (e.g. 'line 3 of x.txt')."""
    segments = self.segments(text, where)
    ids, types = [self._start_id] + segments[0], [0] * (1 + len(segments[0]))
    if len(segments) == 2:
      ids += [SEP_ID] + segments[1]
      types += [0] + [self._type_b] * len(segments[1])
    if self.head != CLM:
      ids.append(SEP_ID)
      types.append(types[-1])
    if len(ids) > self.seq_len:
      raise UserError(f"{where} is {len(ids)} pieces long with its special pieces, but the model "
                      f"reads at most data.seq_len = {self.seq_len}: shorten it.")
    masks = tuple(i for i, t in enumerate(ids) if t == MASK_ID)
    if self.head == CLM:
      if masks:
        raise UserError(f"{where} has {MASK_TEXT}, but this run's model is causal (CLM): it "
                        "predicts the piece after the text. Remove the mask.")
      positions = (len(ids) - 1,)
    elif not masks:
      raise UserError(f"{where} has no {MASK_TEXT}: a {self.head.upper()} model predicts the "
                      f"pieces at masks. Write {MASK_TEXT} where a piece is to be filled in.")
    elif len(masks) > self.num_slots:
      raise UserError(f"{where} has {len(masks)} masks; this PLM model predicts at most "
                      f"{self.num_slots} per text (data.seq_len / partial_prediction).")
    else:
      positions = masks
    return self._row(ids, types, positions)

  def _row(self, ids: Sequence[int], types: Sequence[int], positions: Sequence[int]) -> Row:
    input_ids = np.full(self.seq_len, PAD_ID, np.int32)
    token_type_ids = np.zeros(self.seq_len, np.int32)
    input_ids[:len(ids)], token_type_ids[:len(types)] = ids, types
    return Row(input_ids, token_type_ids, len(ids), tuple(positions))

  # Rows to predictions.

  def _batch(self, rows: Sequence[Row]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The model's batch of `rows` and the prediction slot -> position map `[B, P]` (the
    positions of PLM's target slots, for the others where each slot's prediction is made)."""
    ids = np.stack([r.input_ids for r in rows])
    batch = {"input_ids": ids, "token_type_ids": np.stack([r.token_type_ids for r in rows])}
    slots = np.zeros((len(rows), self.num_slots), np.int32)
    if self.head == PLM:
      orders = [plm_order(r.input_ids, r.positions, self.num_slots) for r in rows]
      batch["plm_perm"] = np.stack([perm for perm, _ in orders])
      batch["plm_target_weights"] = np.stack([weights for _, weights in orders])
      slots = batch["plm_perm"][:, self.seq_len - self.num_slots:]
      hidden = ids.copy()  # Each mask's content is hidden from every stream (module docstring).
      for b, r in enumerate(rows):
        hidden[b, list(r.positions)] = PAD_ID
      batch["input_ids"] = hidden
    else:
      for b, r in enumerate(rows):
        slots[b, :len(r.positions)] = r.positions
      if self.head == MLM:
        batch["mlm_positions"] = slots
    return batch, slots

  def _run(self, rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(top logits [B, P, k], top ids [B, P, k], log-sum-exp [B, P])` of at most batch_size
    rows (padded with copies of the last)."""
    count = len(rows)
    rows = list(rows) + [rows[-1]] * (self.batch_size - count)
    batch, slots = self._batch(rows)
    p = self.pretrained
    with jax.set_mesh(p.mesh), nn.logical_axis_rules(p.rules):
      batch = jax.device_put(batch, self._batch_sharding)
      positions = jax.device_put(slots, self._batch_sharding)
      out = jax.device_get(self._forward(p.params, batch, positions))
    return tuple(np.asarray(x)[:count] for x in out)

  def predict_rows(self, rows: Sequence[Row]) -> list[list[dict[str, Any]]]:
    """Per row, per prediction position (ascending): `{"position", "top": [{"token", "id",
    "logit", "prob"}, ...]}`, the top k by logit."""
    results = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      logits, ids, lse = self._run(chunk)
      for b, row in enumerate(chunk):
        # Slot j predicts position j; PLM's targets fill the last slots.
        first = self.num_slots - len(row.positions) if self.head == PLM else 0
        predictions = []
        for s, position in enumerate(row.positions, start=first):
          top = [{"token": self.tokenizer.id_to_piece(int(i)), "id": int(i), "logit": float(lg),
                  "prob": float(np.exp(lg - lse[b, s]))} for i, lg in zip(ids[b, s], logits[b, s])]
          predictions.append({"position": int(position), "top": top})
        results.append(predictions)
    return results

  def continue_rows(self, rows: Sequence[Row], max_new_tokens: int) -> list[list[int]]:
    """CLM only: each row's greedy continuation, up to `max_new_tokens` pieces, ending before
    `[SEP]` (end of document). A row that fills seq_len slides: its first piece is dropped."""
    if self.head != CLM:
      raise UserError(f"Continuing text needs a causal (CLM) model; this run predicts with "
                      f"{self.head.upper()}.")
    new: list[list[int]] = [[] for _ in rows]
    for start in range(0, len(rows), self.batch_size):
      live = {start + b: (list(r.input_ids[:r.length]), list(r.token_type_ids[:r.length]))
              for b, r in enumerate(rows[start:start + self.batch_size])}
      for _ in range(max_new_tokens):
        if not live:
          break
        current = [self._row(ids, types, (len(ids) - 1,)) for ids, types in live.values()]
        _, top_ids, _ = self._run(current)
        for (index, (ids, types)), piece in zip(list(live.items()), top_ids[:, 0, 0]):
          if piece == SEP_ID:
            del live[index]
            continue
          new[index].append(int(piece))
          ids.append(int(piece))
          types.append(types[-1])
          if len(ids) > self.seq_len:
            del ids[0], types[0]
    return new

  def __call__(self, texts: Sequence[str], *, max_new_tokens: int = 0,
               names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One dict per text: `text`, `input_ids` (the row without its padding), `predictions`
    (as `predict_rows`) and, with `max_new_tokens`, `continuation` (CLM's greedy text). Every
    text is checked before any is run; `names` name them in errors (default 'text i')."""
    if max_new_tokens and self.head != CLM:
      raise UserError(f"max_new_tokens continues text with a causal (CLM) model; this run "
                      f"predicts with {self.head.upper()}.")
    names = names or [f"text {i + 1}" for i in range(len(texts))]
    rows = [self.encode(text, where) for text, where in zip(texts, names)]
    predictions = self.predict_rows(rows)
    out = [{"text": text, "input_ids": [int(i) for i in row.input_ids[:row.length]],
            "predictions": preds} for text, row, preds in zip(texts, rows, predictions)]
    if max_new_tokens:
      for item, pieces in zip(out, self.continue_rows(rows, max_new_tokens)):
        item["continuation"] = self._continuation(item["input_ids"], pieces)
    return out

  def _continuation(self, prefix: Sequence[int], pieces: Sequence[int]) -> str:
    """The text `pieces` add to `prefix`'s, with the space a word-initial first piece brings
    (decoding the pieces alone would drop it)."""
    before = self.tokenizer.decode(prefix)
    after = self.tokenizer.decode(list(prefix) + list(pieces))
    return after[len(before):] if after.startswith(before) else self.tokenizer.decode(pieces)


def fill_mask(pretrained, texts: Sequence[str], top_k: int = 5, *, batch_size: int = 8,
              max_new_tokens: int = 0) -> list[dict[str, Any]]:
  """Predictions for `texts` with the run's own head (see the module docstring): one dict per
  text with `text`, `input_ids` and `predictions` (`[{"position", "top": [{"token", "id",
  "logit", "prob"}, ...]}, ...]`). E.g.

      p = pretrained.load("runs/tiny")
      fill_mask(p, ["The [MASK] of the hacker."])[0]["predictions"][0]["top"][0]["token"]
  """
  return Predictor(pretrained, top_k=top_k, batch_size=batch_size)(
      texts, max_new_tokens=max_new_tokens)


# Files and printing (`python -m jaxlm.predict`).


def read_texts(path: str) -> list[str]:
  """The lines of a UTF-8 text file, one text each (without their line ends)."""
  if not os.path.isfile(path):
    raise UserError(f"The input file {path} does not exist.")
  with open(path, encoding="utf-8") as f:
    texts = [line.rstrip("\r\n") for line in f]
  if not texts:
    raise UserError(f"The input file {path} is empty.")
  return texts


def check_output(path: str) -> None:
  """Fails now, not after the predictions, if the file `path` cannot be written."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UserError(f"The output {path} is a folder; name a file in it.")
  try:
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".predict-check-"):
      pass
  except OSError as e:
    raise UserError(f"Cannot write the output {path}: {folder} is not a writable folder "
                    f"({e.strerror or e}).") from None


def write_jsonl(path: str, items: Sequence[dict[str, Any]]) -> None:
  """One JSON object per line, all or none: a temporary file beside `path`, then renamed."""
  folder = os.path.dirname(os.path.abspath(path))
  with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".predict-", suffix=".jsonl",
                                   delete=False, encoding="utf-8") as f:
    for item in items:
      f.write(json.dumps(item, ensure_ascii=False) + "\n")
  os.chmod(f.name, 0o644)  # NamedTemporaryFile makes it private.
  os.replace(f.name, path)


def format_predictions(item: dict[str, Any], head: str) -> str:
  """A text's predictions for people: the text, then one line per mask (CLM: the next piece)
  with each top piece and its probability, and any continuation."""
  lines = [item["text"]]
  for n, prediction in enumerate(item["predictions"], start=1):
    label = "next piece" if head == CLM else f"{MASK_TEXT} #{n}"
    top = "  ".join(f"{t['token']} {t['prob']:.3f}" for t in prediction["top"])
    lines.append(f"  {label} (position {prediction['position']}): {top}")
  if "continuation" in item:
    lines.append(f"  continuation: {item['text']}{item['continuation']}")
  return "\n".join(lines)
