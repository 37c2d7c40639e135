"""Which pretraining objective, at tiny size: MLM + NSP, MLM, PLM, MLM + PLM and CLM.

  python -m jaxlm.sweep --config=experiments/ablation_objectives.py --workdir=runs/objectives
  python -m jaxlm.sweep --config=experiments/ablation_objectives.py --workdir=runs/objectives \\
      --config.train.steps=30 --only=mlm,plm      # a quick look at two points

The tiny recipe of `bert_tiny.py` (`recipes.tiny_fast`: L2 H128, 128-piece vocabulary, pre-LN,
seq 64, batch 128, 300 steps) for every point, so that only the objective differs:

- One position encoding for all points, `relative` (Transformer-XL's, as `xlnet_tiny.py`): at
  this size it measured better for MLM as well as PLM (README, Results: eval MLM accuracy 0.366
  vs 0.202 with absolute positions, PLM 0.213 vs 0.136), and absolute positions would leave PLM
  on the unigram plateau, measuring the position table rather than the objective.
- One data format, `full_sentences`, for every point but `mlm_nsp`, which needs NSP's `pairs`
  (that point changes the format too, by necessity). CLM reads `full_sentences` too rather than
  GPT's `packed`, so that its inputs are those of the others.
- The same fixed eval set for all (it depends on neither the objectives nor the format), and the
  same initialisation: `seeds.init` is shared, so arms differing in heads start from the same
  encoder weights.

Evaluating every 20 steps (about 7% more time) gives the summary's equal-compute table eval rows
to interpolate between: MLM + PLM (two encoder passes per step) spends about 1.8 times the FLOPs
per step of MLM, so it meets the cheapest point's budget near its middle.
`python -m jaxlm.train --config=experiments/ablation_objectives.py` alone runs the `mlm` point.
"""

from configs import recipes

_OBJECTIVES = ("mlm", "nsp", "plm", "clm")


def get_config():
  """The base of every point: MLM alone on full sentences, relative positions."""
  config = recipes.tiny_fast()
  config.data.format = "full_sentences"
  config.objectives.nsp.weight = 0.0
  config.model.position_encoding = "relative"
  config.train.eval_every = 20
  return config


def _point(name: str, data_format: str, **weights: float) -> dict:
  """A point that sets every objective's weight (those not named: 0) and the data format."""
  overrides = {f"objectives.{o}.weight": weights.get(o, 0.0) for o in _OBJECTIVES}
  return {"name": name, "overrides": {**overrides, "data.format": data_format}}


def get_sweep():
  """The points: a name and the overrides of the base config (see jaxlm/sweep.py)."""
  return [
      _point("mlm_nsp", "pairs", mlm=1.0, nsp=1.0),
      _point("mlm", "full_sentences", mlm=1.0),
      _point("plm", "full_sentences", plm=1.0),
      _point("mlm_plm", "full_sentences", mlm=1.0, plm=1.0),
      _point("clm", "full_sentences", clm=1.0),
  ]
