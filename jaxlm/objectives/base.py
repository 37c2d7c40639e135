"""What an objective is, and the registry that finds one by name.

An objective owns everything about itself: its config keys (`objectives.<name>.*`), how it
corrupts a batch on the host, which model head it needs, and its loss and metrics. Adding one
is one new file here that calls `register`; the train step and the loader never name it.
"""

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm.errors import UserError, closest

Batch = dict[str, np.ndarray]
# Metric name -> (sum, count) over the batch; the logged value is sum / count, so metrics add up
# exactly over steps, micro-batches and hosts.
Aux = dict[str, tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What objectives may know about the data: the tokenizer's size and word boundaries."""

  vocab_size: int  # Of the tokenizer (random replacement tokens are drawn below it).
  seq_len: int
  word_start: np.ndarray  # [vocab_size] bool: piece begins a word.


class Objective(abc.ABC):
  """One pretraining objective. Subclasses set `name`, `head` and `default_options`."""

  name: ClassVar[str]
  head: ClassVar[type[nn.Module] | None] = None
  default_options: ClassVar[Mapping[str, Any]] = {}
  # Keys of `eval.<name>`: how the fixed eval set is corrupted for this objective, shared by
  # every arm of an ablation whatever it trains with.
  default_eval_options: ClassVar[Mapping[str, Any]] = {}
  # The example formats (`data.format`) it can train on; None = any. Objectives limited to
  # `pairs` are evaluated on the fixed eval pairs, the others on the fixed eval windows.
  formats: ClassVar[tuple[str, ...] | None] = None
  # The encoder's view it needs (`models.pretrainer.VIEWS`): bidirectional (MLM, NSP), causal
  # (CLM) or permuted (PLM's two streams). A run makes one encoder pass per view, sharing every
  # weight.
  view: ClassVar[str] = "bidirectional"
  # The batch key where its host transform writes the input ids it corrupted (MLM's masked ids),
  # read by the bidirectional pass; other views keep reading the uncorrupted `input_ids`.
  corrupted_input: ClassVar[str | None] = None
  # Whether eval reports the perplexity exp(loss): for token predictions, not for classifiers.
  perplexity: ClassVar[bool] = True

  def __init__(self, options: ml_collections.ConfigDict, data: DataSpec,
               eval_options: ml_collections.ConfigDict | None = None):
    self.options = options
    self.weight = float(options.weight)
    self.data = data
    self.eval_options = eval_options

  @property
  def evaluated_on_pairs(self) -> bool:
    return self.formats == ("pairs",)

  def example_options(self) -> dict[str, Any]:
    """Options for building examples this objective needs (e.g. NSP's random-next pairs)."""
    return {}

  def host_transform(self, batch: Batch, keys_B: np.ndarray) -> Batch:
    """Corrupts a host batch (numpy), one uint64 key per example. Default: unchanged."""
    return batch

  def eval_transform(self, batch: Batch, keys_B: np.ndarray) -> Batch:
    """The corruption of the fixed eval set (from `eval.<name>`). Default: the training one."""
    return self.host_transform(batch, keys_B)

  def flops_per_token(self, model: Any, predictions_per_seq: float | None = None) -> float:
    """Training FLOPs per input token of this objective's head and of any work its view adds
    to an encoder pass (PLM's query stream), for MFU. `predictions_per_seq`: the mean number
    of predictions per sequence measured in the batches, for objectives whose head cost follows
    it (None: the objective's own expectation)."""
    return 0.0

  @abc.abstractmethod
  def loss(self, outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]) -> tuple[jax.Array, Aux]:
    """Returns the mean loss over the batch and the `(sum, count)` metrics."""


_REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
  _REGISTRY[cls.name] = cls
  return cls


def build_objectives(config: ml_collections.ConfigDict, data: DataSpec,
                     eval_config: ml_collections.ConfigDict | None = None) -> list[Objective]:
  """The enabled objectives (weight > 0), in config order. Unknown names or keys are errors."""
  eval_config = eval_config if eval_config is not None else ml_collections.ConfigDict()
  for name, options in eval_config.items():
    known = _REGISTRY[name].default_eval_options if name in _REGISTRY else {}
    unknown = set(options) - set(known)
    if name not in _REGISTRY or unknown:
      key = sorted(unknown)[0] if name in _REGISTRY else ""
      raise UserError(f"Unknown key eval.{name}{'.' + key if key else ''}."
                      f"{closest(key or name, known or _REGISTRY)}")
  enabled = []
  for name, options in config.items():
    if name not in _REGISTRY:
      raise UserError(
          f"Unknown objective '{name}' in config.objectives.{closest(name, _REGISTRY)} "
          f"Registered: {sorted(_REGISTRY)}."
      )
    unknown = set(options) - set(_REGISTRY[name].default_options)
    if unknown:
      key = sorted(unknown)[0]
      raise UserError(
          f"Unknown key objectives.{name}.{key}.{closest(key, _REGISTRY[name].default_options)}"
      )
    if options.weight < 0:
      raise UserError(f"objectives.{name}.weight is {options.weight}; use 0 to disable it.")
    if options.weight > 0:
      enabled.append(_REGISTRY[name](options, data, eval_config.get(name)))
  if not enabled:
    raise UserError("Every objective has weight 0: enable one, e.g. --config.objectives.mlm.weight=1.")
  return enabled


def mean_cross_entropy(
    logits: jax.Array, labels: jax.Array, weights: jax.Array, prefix: str
) -> tuple[jax.Array, Aux]:
  """Weighted token cross-entropy and accuracy, as a mean loss and `(sum, count)` metrics."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  count = jnp.sum(weights)
  loss_sum = jnp.sum(nll * weights)
  aux = {
      f"{prefix}_loss": (loss_sum, count),
      f"{prefix}_accuracy": (jnp.sum(correct * weights), count),
  }
  return loss_sum / jnp.maximum(count, 1.0), aux
