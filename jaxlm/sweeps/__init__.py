"""Sweeps of training runs: the runner is `jaxlm/sweep.py`; `summary.py` reads what they wrote."""
