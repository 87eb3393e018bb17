"""Constructors of the learning-rate-free optimizers users pick instead of tuning: imported on first use.

Prodigy (``prodigyopt``), Schedule-Free AdamW (``schedulefree``), D-Adaptation Adam (``dadaptation``) and
DoG / LDoG (``dog-optimizer``, import name ``dog``) come with the ``experiments`` extra, not with the core.
An :class:`ExternalOptimizer` stands for one of their classes in the baseline registry: the package is
imported only when the optimizer is built (or its signature is read), and a missing package is one
``ImportError`` naming the extra:

    >>> from hf_camhd.baselines.external import ExternalOptimizer
    >>> ctor = ExternalOptimizer("surely_not_installed_pkg", "Opt", "surely-not-installed")
    >>> ctor([])
    Traceback (most recent call last):
    hf_camhd._extras.MissingDependencyError: the surely-not-installed baseline needs surely_not_installed_pkg, which is not installed: pip install 'hf_camhd[experiments]'
"""

from __future__ import annotations

import inspect
from typing import Any

from .._extras import require

__all__ = ["ExternalOptimizer"]


class ExternalOptimizer:
    """``module.attr`` (an optimizer class of an optional package), imported on first use.

    Calling it builds the optimizer; :func:`inspect.signature` of it is the class's, so the registry's
    keyword checks work as for any other constructor.
    """

    def __init__(self, module: str, attr: str, baseline: str, extra: str = "experiments"):
        self.module, self.attr, self.baseline, self.extra = module, attr, baseline, extra

    def load(self) -> type:
        """The class (imports the package; ImportError naming the extra when it is missing)."""
        return getattr(require(f"the {self.baseline} baseline", self.module, extra=self.extra), self.attr)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.load())

    def __call__(self, params: Any, **kwargs: Any):
        return self.load()(params, **kwargs)

    def __repr__(self) -> str:
        return f"{self.module}.{self.attr}"
