"""The optax chain: global-norm clipping, AdamW with a weight-decay mask, warm-up then decay."""

import jax
import ml_collections
import optax

from jaxlm.config import DECAYS
from jaxlm.errors import UserError

# Every parameter name is placed here on purpose: a new one outside both sets is an error, not a
# silent default. Weight matrices and embedding tables decay (BERT, XLNet). LayerNorm scales,
# biases, relative attention's per-head biases (Transformer-XL's u and v) and the query stream's
# single start vector do not: they are offsets, not weights, and decay would only pull them to 0.
# `a` and `b`: LoRA's low-rank factors (training/lora.py), decayed as the kernels they adapt.
# `output_embedding`: an untied MLM / LM output table (`model.tie_output_embedding=False`).
_DECAYED_NAMES = frozenset({"kernel", "embedding", "a", "b", "output_embedding"})
_UNDECAYED_NAMES = frozenset({"bias", "scale", "content_bias", "position_bias", "query_start"})


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to the peak, then `decay` to `end_learning_rate_ratio` x peak.

  `trapezoid` (a one-cycle schedule: warm-up, constant, cool-down) holds the peak until the last
  `cooldown_fraction` of `total_steps`, then decays linearly: a budget-aware run spends most of
  its steps at the peak and still ends annealed (Izsak et al. 2021; Geiping & Goldstein 2023).
  """
  peak = config.learning_rate
  end = peak * config.end_learning_rate_ratio
  decay_steps = max(1, total_steps - config.warmup_steps)
  if config.decay == "trapezoid":
    fraction = config.get("cooldown_fraction", 0.0)
    if not 0.0 < fraction <= 1.0:
      raise UserError(f"optimizer.cooldown_fraction is {fraction}; decay 'trapezoid' needs it in "
                      "(0, 1]: the share of train.steps spent decaying to the end rate.")
    cooldown = min(decay_steps, max(1, round(fraction * total_steps)))
    after = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, end, cooldown)],
        [decay_steps - cooldown])
  elif config.decay == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif config.decay == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_learning_rate_ratio)
  elif config.decay == "constant":
    after = optax.constant_schedule(peak)
  else:
    raise UserError(f"optimizer.decay is '{config.decay}'; use one of {DECAYS}.")
  if config.warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
  return optax.join_schedules([warmup, after], [config.warmup_steps])


def decay_mask(params):
  """True for weight matrices and embeddings, False for LayerNorm parameters and biases (see
  `_DECAYED_NAMES`); a parameter of another name is an error.

  Works on plain and on `nn.Partitioned`-boxed trees: the decision is made on the last
  dictionary key of each leaf's path (the parameter's name).
  """

  def decayed(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names and names[-1] in _DECAYED_NAMES:
      return True
    if names and names[-1] in _UNDECAYED_NAMES:
      return False
    raise ValueError(f"Parameter {'/'.join(map(str, names))} is in neither the decayed nor the "
                     "undecayed names of jaxlm/training/optimizer.py: place it in one.")

  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(config, total_steps)
  parts = []
  if config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.clip_norm))
  parts += [
      optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
      optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
      optax.scale_by_learning_rate(schedule),
  ]
  return optax.chain(*parts), schedule
