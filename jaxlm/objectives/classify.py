"""Sequence classification, the objective of fine-tuning: one label per example.

Built directly by fine-tuning with the number of classes (from the training file's label map),
not from `config.objectives`, so it is not in the pretraining registry. Reads the batch keys of
`jaxlm.data.labelled`: `labels` (int32 [B]) and `label_weights` (float32 [B], 0 on the padding
rows of the last eval batch).
"""

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jaxlm.errors import UserError
from jaxlm.models.heads import ClassificationHead
from jaxlm.objectives.base import Aux, Objective, mean_cross_entropy


class Classify(Objective):
  """Cross-entropy over `num_classes` from the pooled [CLS] output.

  Metrics, as `(sum, count)` pairs over the weighted rows: `classify_loss`, `accuracy`, and
  with two classes `f1` of class 1 as (2 TP, 2 TP + FP + FN), so that adding the pairs over
  batches and hosts gives the F1 of the whole set (not a mean of per-batch F1s).
  """

  name = "classify"
  perplexity = False  # A classifier's loss is not a language model's.

  def __init__(self, num_classes: int, *, weight: float = 1.0):
    if num_classes < 2:
      raise UserError(f"Classification needs at least 2 classes, got {num_classes}.")
    super().__init__(ml_collections.ConfigDict({"weight": weight}), data=None)
    self.num_classes = num_classes
    self.head = functools.partial(ClassificationHead, num_classes=num_classes)

  def loss(self, outputs: Mapping[str, jax.Array],
           batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Aux]:
    logits_BC = outputs[self.name]
    labels_B = batch["labels"]
    weights_B = batch["label_weights"].astype(jnp.float32)
    loss, metrics = mean_cross_entropy(logits_BC, labels_B, weights_B, self.name)
    aux = {f"{self.name}_loss": metrics[f"{self.name}_loss"],
           "accuracy": metrics[f"{self.name}_accuracy"]}
    if self.num_classes == 2:
      predicted_B = jnp.argmax(logits_BC, axis=-1) == 1
      actual_B = labels_B == 1
      tp = jnp.sum(weights_B * (predicted_B & actual_B))
      fp = jnp.sum(weights_B * (predicted_B & ~actual_B))
      fn = jnp.sum(weights_B * (~predicted_B & actual_B))
      aux["f1"] = (2.0 * tp, 2.0 * tp + fp + fn)
    return loss, aux
