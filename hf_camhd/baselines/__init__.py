"""Baseline optimizers for the CAM-HD paper's comparisons.

* :class:`AdaBound` (Luo et al., ICLR 2019) and :class:`L4` (Rolinek & Martius, NeurIPS 2018),
  implemented here;
* Adam, AdamW, SGD, SGD-Nesterov and RAdam from :mod:`torch.optim`;
* Prodigy, Schedule-Free AdamW, D-Adaptation Adam, DoG and LDoG — the learning-rate-free optimizers users
  pick instead — from their packages (the ``experiments`` extra), imported when one is built;
* :data:`BASELINES` / :func:`create_baseline`: all of them by name with the paper's (or their READMEs') defaults.

L4 needs the loss at every step (``optimizer.step(lambda: loss)``); check :func:`requires_loss`.
"""

from .adabound import AdaBound
from .l4 import L4
from .registry import (
    BASELINES,
    BaselineSpec,
    baseline_names,
    create_baseline,
    get_baseline,
    requires_loss,
    resolve_hyperparameters,
)

__all__ = [
    "AdaBound",
    "BASELINES",
    "BaselineSpec",
    "L4",
    "baseline_names",
    "create_baseline",
    "get_baseline",
    "requires_loss",
    "resolve_hyperparameters",
]
