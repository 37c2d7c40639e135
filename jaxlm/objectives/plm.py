"""Permuted language modelling, as in XLNet (Yang et al. 2019), with two-stream attention.

Config `objectives.plm`: `weight`, `partial_prediction` (K: predict 1/K of the tokens, the last
of the factorisation order; XLNet's 6), `perm_size` (XLNet's local permutation: one random order
per block of this many positions; 0 = the whole sequence), `span_targets` (targets are spans of
1..`max_span_words` whole words, p(n) ~ 1/n, instead of single pieces).

On the host (`data/permutation.py`) each sequence gets a target set and a factorisation order,
written as `plm_perm`: the slot order non-targets first, then the targets in order. The model's
permuted view (`models/pretrainer.py`) reorders the clean ids by it, so its two masks are
constants of `(L, P)`: a target's query stream sees the non-targets and the targets before it,
never its own token; its content stream also sees itself. The loss is the cross-entropy of each
target from its query stream through the tied output embedding.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data.permutation import PermutationOptions, num_target_slots, sample_permutation
from jaxlm.data.tokenizer import NUM_SPECIAL
from jaxlm.errors import UserError
from jaxlm.models.heads import PlmHead
from jaxlm.objectives.base import Aux, Batch, Objective, mean_cross_entropy, register


@register
class PermutedLm(Objective):
  name = "plm"
  head = PlmHead
  view = "permuted"
  default_options = dict(
      weight=1.0,
      partial_prediction=6,
      perm_size=0,
      span_targets=False,
      max_span_words=5,
  )
  # XLNet's recipe, whatever an arm trains with: single-piece targets over the whole sequence.
  default_eval_options = dict(
      partial_prediction=6,
      perm_size=0,
      span_targets=False,
      max_span_words=5,
  )

  def __init__(self, options, data, eval_options=None):
    super().__init__(options, data, eval_options)
    self.permutation = _permutation(options, "objectives.plm")
    self.eval_permutation = _permutation(eval_options or dict(self.default_eval_options),
                                         "eval.plm")

  def host_transform(self, batch: Batch, keys_B: np.ndarray) -> Batch:
    return self._permute(batch, keys_B, self.permutation)

  def eval_transform(self, batch: Batch, keys_B: np.ndarray) -> Batch:
    return self._permute(batch, keys_B, self.eval_permutation)

  def _permute(self, batch: Batch, keys_B: np.ndarray, options: PermutationOptions) -> Batch:
    ids_BL = batch["input_ids"]
    sampled = sample_permutation(ids_BL, keys_B, options, word_start_V=self.data.word_start)
    num_targets = sampled["plm_target_weights"].shape[1]
    target_ids_BP = np.take_along_axis(ids_BL, sampled["plm_perm"][:, -num_targets:], axis=1)
    return {**batch, **sampled, "plm_target_ids": target_ids_BP.astype(np.int32)}

  def flops_per_token(self, model, predictions_per_seq: float | None = None) -> float:
    """What the permuted view adds to a full encoder pass: the query stream and the head, at P
    of every L positions, less the part of the content stream's last layer that nothing reads.

    A query row runs every layer's query and output projections and MLP (keys and values come
    from the content stream) and attends over all L keys (with relative attention, also over
    2L offsets); the head adds the transform and the vocabulary projection. The last query
    layer reads only the keys and values of the content stream's input to it, so XLA drops the
    rest of that content layer: its query and output projections, MLP and attention.
    """
    del predictions_per_seq  # Every target slot runs the query stream (padded ones too).
    d, f, n, length = model.hidden_size, model.mlp_dim, model.num_layers, self.data.seq_len
    share = num_target_slots(length, self.permutation.partial_prediction) / length
    attention = 2 * length * d * (2 if model.position_encoding == "relative" else 1)
    per_query = n * (2 * d * d + 2 * d * f + attention) + d * model.vocab_size + d * d
    unread_content = 2 * d * d + 2 * d * f + attention
    return 6.0 * (share * per_query - unread_content)

  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Aux]:
    loss, aux = mean_cross_entropy(outputs["plm"], batch["plm_target_ids"],
                                   batch["plm_target_weights"], "plm")
    # What the sampling really did: the share of text tokens predicted, and the mean length of
    # the runs of adjacent targets (about 1 for single pieces; whole-word spans make it longer).
    perm_BL, weights_BP = batch["plm_perm"], batch["plm_target_weights"]
    rows_B1 = jnp.arange(perm_BL.shape[0])[:, None]
    target_BL = jnp.zeros(perm_BL.shape, bool).at[
        rows_B1, perm_BL[:, perm_BL.shape[1] - weights_BP.shape[1]:]].set(weights_BP > 0)
    run_starts = jnp.sum(target_BL[:, 0]) + jnp.sum(target_BL[:, 1:] & ~target_BL[:, :-1])
    predicted = jnp.sum(weights_BP)
    aux["plm_target_rate"] = (predicted,
                              jnp.sum(batch["input_ids"] >= NUM_SPECIAL).astype(jnp.float32))
    aux["plm_span_length"] = (predicted, run_starts.astype(jnp.float32))
    return loss, aux


def _permutation(options, prefix: str) -> PermutationOptions:
  """Checked permutation options."""
  if options["partial_prediction"] < 1 or options["perm_size"] < 0 or options[
      "max_span_words"] < 1:
    raise UserError(f"{prefix}.partial_prediction and {prefix}.max_span_words must be at least 1 "
                    f"and {prefix}.perm_size at least 0 (0: one order over the whole sequence).")
  return PermutationOptions(partial_prediction=int(options["partial_prediction"]),
                            perm_size=int(options["perm_size"]),
                            span_targets=bool(options["span_targets"]),
                            max_span_words=int(options["max_span_words"]))
