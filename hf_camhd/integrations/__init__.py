"""Integrations with ``transformers.Trainer``, ``accelerate`` and timm's optimizer factory.

Each submodule imports its library only when imported itself:

* :mod:`hf_camhd.integrations.transformers` — ``CAMHDOptimizerFactory``, ``CAMHDCallback``, ``CAMHDTrainer``;
* :mod:`hf_camhd.integrations.accelerate` — helpers for ``accelerate`` scripts (logging the learned rates,
  unwrapping the optimizer); ``accelerator.prepare`` needs nothing from here;
* :mod:`hf_camhd.integrations.timm` — ``camhdadam`` / ``camhdadamw`` / ``camhdsgd`` / ``camhdsgdn`` in
  ``timm.optim.create_optimizer_v2`` (registered by ``import hf_camhd``).
"""

from __future__ import annotations

from typing import Any

from ..optim import CAMHDOptimizer

__all__ = ["unwrap_camhd"]


def unwrap_camhd(optimizer: Any) -> CAMHDOptimizer | None:
    """The CAM-HD optimizer inside ``optimizer`` (itself, or inside ``accelerate``'s ``AcceleratedOptimizer`` or any
    wrapper that keeps it as ``.optimizer``), or ``None`` when there is none."""
    for _ in range(8):
        if optimizer is None or isinstance(optimizer, CAMHDOptimizer):
            break
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer if isinstance(optimizer, CAMHDOptimizer) else None
