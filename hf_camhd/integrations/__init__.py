"""Integrations with ``transformers.Trainer``, ``accelerate`` and timm's optimizer registry.

Each submodule needs its library (``pip install 'hf_camhd[hf]'``; importing it without one raises one
``ImportError`` that says so):

* :mod:`hf_camhd.integrations.transformers` — ``CAMHDOptimizerFactory``, ``CAMHDCallback``, ``CAMHDTrainer``;
* :mod:`hf_camhd.integrations.accelerate` — helpers for ``accelerate`` scripts (logging the learned rates, an
  early check); ``accelerator.prepare`` needs nothing from here;
* :mod:`hf_camhd.integrations.timm` — ``camhdadam`` / ``camhdadamw`` / ``camhdsgd`` / ``camhdsgdn`` in timm's
  optimizer registry (registered by ``import hf_camhd`` as soon as timm's optimizer factory is imported);
  :mod:`hf_camhd.integrations.timm_train` runs timm's own ``train.py`` with them.

This package itself needs only torch: :func:`unwrap_camhd` and the lazy timm registration live here.

    >>> import torch
    >>> from hf_camhd import CAMHDAdam
    >>> from hf_camhd.integrations import unwrap_camhd
    >>> opt = CAMHDAdam(torch.nn.Linear(2, 2), lr=1e-3)
    >>> class Wrapper:  # what accelerate's AcceleratedOptimizer looks like from outside
    ...     def __init__(self, optimizer):
    ...         self.optimizer = optimizer
    >>> unwrap_camhd(Wrapper(opt)) is opt, unwrap_camhd(torch.optim.SGD(torch.nn.Linear(2, 2).parameters()))
    (True, None)
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

from ..optim import CAMHDOptimizer

__all__ = ["register_timm_optimizers_lazily", "unwrap_camhd", "unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside wrappers that keep it as ``.optimizer`` (``accelerate``'s ``AcceleratedOptimizer``, which
    is also what ``Trainer.optimizer`` is after training starts, timm's ``Lookahead``, ...): the innermost one.

        >>> import torch
        >>> sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        >>> class Wrapper:
        ...     optimizer = sgd
        >>> unwrap_optimizer(Wrapper()) is sgd, unwrap_optimizer(sgd) is sgd
        (True, True)
    """
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(optimizer, CAMHDOptimizer) or inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def unwrap_camhd(optimizer: Any) -> CAMHDOptimizer | None:
    """The CAM-HD optimizer inside ``optimizer`` (itself, or inside any wrapper :func:`unwrap_optimizer` sees
    through), or ``None`` when there is none."""
    inner = unwrap_optimizer(optimizer)
    return inner if isinstance(inner, CAMHDOptimizer) else None


# ------------------------------------------------------------------------------------------ timm, lazily
_TIMM_FACTORY = "timm.optim._optim_factory"


def _register_timm() -> None:
    module = sys.modules.get(__name__ + ".timm")
    if module is not None and not hasattr(module, "register_timm_optimizers"):
        return  # hf_camhd.integrations.timm is importing timm right now: it registers at the end of its import
    from .timm import register_timm_optimizers

    register_timm_optimizers()


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers the CAM-HD optimizers right after timm's optimizer factory module is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TIMM_FACTORY:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            sys.modules.setdefault(fullname, module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_timm()

        spec.loader.exec_module = exec_then_register
        return spec


def register_timm_optimizers_lazily() -> None:
    """What ``import hf_camhd`` calls: register the timm names now if timm's optimizer factory is already
    imported, else when it gets imported. timm itself is not imported here; without timm nothing happens."""
    if _TIMM_FACTORY in sys.modules:
        _register_timm()
    elif importlib.util.find_spec("timm") is not None and not any(isinstance(f, _RegisterOnImport)
                                                                   for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
