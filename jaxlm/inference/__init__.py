"""Using a pretrained run: fill in masks (MLM, PLM) or predict the next piece (CLM).

    from jaxlm.inference.fill_mask import fill_mask
    from jaxlm.training import pretrained
    fill_mask(pretrained.load("runs/tiny"), ["The [MASK] of the hacker."], top_k=5)

`Predictor` compiles once and serves many calls (`Predictor(run, top_k=5)(texts)`).
"""

from jaxlm.inference.fill_mask import Predictor, Row, plm_order, prediction_head  # noqa: F401
