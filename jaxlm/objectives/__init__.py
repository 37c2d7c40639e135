"""Pretraining objectives as plug-ins: each file registers one `Objective` by name."""

from jaxlm.objectives.base import DataSpec, Objective, build_objectives
from jaxlm.objectives import clm, mlm, nsp, plm  # noqa: F401  (registers them)
from jaxlm.objectives.classify import Classify  # noqa: F401  (fine-tuning; not registered)
