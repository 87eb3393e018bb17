"""The baseline optimizers of the CAM-HD paper's experiments (and the learning-rate-free ones), by name, with defaults.

==========  ============  ==============================  =============================================
name        display name  optimizer                       defaults
==========  ============  ==============================  =============================================
adam        Adam          :class:`torch.optim.Adam`       ``lr=1e-3``
adamw       AdamW         :class:`torch.optim.AdamW`      ``lr=1e-3, weight_decay=1e-2``
sgd         SGD           :class:`torch.optim.SGD`        ``lr=0.1, momentum=0.9``
sgdn        SGDN          :class:`torch.optim.SGD`        ``lr=0.1, momentum=0.9, nesterov=True``
radam       RAdam         :class:`torch.optim.RAdam`      ``lr=1e-3``
adabound    AdaBound      :class:`~.adabound.AdaBound`    ``lr=1e-3, final_lr=0.1, gamma=1e-3``
adam-l4     Adam-L4       :class:`~.l4.L4` (Adam dir.)    ``alpha=0.15`` (``lr`` is accepted for alpha)
==========  ============  ==============================  =============================================

The learning-rate-free optimizers users pick instead of tuning a rate, with their READMEs' settings (their
packages come with the ``experiments`` extra and are imported only when one is built,
:mod:`hf_camhd.baselines.external`):

==================  ===================  ==================================  ==================================
name                display name         optimizer                           defaults
==================  ===================  ==================================  ==================================
prodigy             Prodigy              ``prodigyopt.Prodigy``              ``lr=1.0`` (README: "use lr=1.")
schedulefree-adamw  Schedule-Free AdamW  ``schedulefree.AdamWScheduleFree``  ``lr=0.0025`` (its default)
dadapt-adam         D-Adapt Adam         ``dadaptation.DAdaptAdam``          ``lr=1.0`` (README: "set to 1.0")
dog                 DoG                  ``dog.DoG``                         ``lr=1.0, reps_rel=1e-6``
ldog                LDoG                 ``dog.LDoG`` (per-tensor steps)     ``lr=1.0, reps_rel=1e-6``
==================  ===================  ==================================  ==================================

Schedule-Free must be switched with ``optimizer.train()`` / ``optimizer.eval()``, and DoG / LDoG need
iterate averaging (``dog.PolynomialDecayAverager``); ``hf-camhd compare`` does both.

Example::

    >>> import torch
    >>> from hf_camhd.baselines import create_baseline
    >>> opt = create_baseline("sgdn", [torch.nn.Parameter(torch.zeros(3))], lr=0.05)
    >>> opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["nesterov"]
    (0.05, 0.9, True)

An optimizer whose ``requires_loss`` is true (L4) must be stepped with a closure returning the loss:
``opt.step(lambda: loss)``; :attr:`BaselineSpec.requires_loss` and :func:`requires_loss` tell a
training loop so.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch.optim import Optimizer

from .adabound import AdaBound
from .external import ExternalOptimizer
from .l4 import L4

__all__ = ["BASELINES", "BaselineSpec", "baseline_names", "create_baseline", "get_baseline",
           "requires_loss", "resolve_hyperparameters"]


@dataclass(frozen=True)
class BaselineSpec:
    """One baseline optimizer: its registry ``name``, the ``display_name`` used in the paper's tables,
    the ``constructor`` (called as ``constructor(params, **hyperparameters)``), the paper's default
    ``hyperparameters`` (read-only mapping), keyword ``aliases`` (alias -> real keyword) and a short
    literature ``reference``."""

    name: str
    display_name: str
    constructor: Callable[..., Optimizer]
    hyperparameters: Mapping[str, Any] = field(default_factory=dict, hash=False)
    aliases: Mapping[str, str] = field(default_factory=dict, hash=False)
    reference: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hyperparameters", MappingProxyType(dict(self.hyperparameters)))
        object.__setattr__(self, "aliases", MappingProxyType(dict(self.aliases)))

    @property
    def requires_loss(self) -> bool:
        """True when ``step`` needs a closure returning the loss (L4)."""
        return bool(getattr(self.constructor, "requires_loss", False))

    def accepted_keywords(self) -> tuple[str, ...] | None:
        """Keywords the constructor accepts besides ``params`` (``None``: it takes ``**kwargs``)."""
        sig = inspect.signature(self.constructor)
        names = []
        for i, (pname, p) in enumerate(sig.parameters.items()):
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                return None
            if p.kind is inspect.Parameter.VAR_POSITIONAL or pname in ("self", "params") or i == 0:
                continue
            names.append(pname)
        return tuple(names)

    def resolve(self, **overrides: Any) -> dict[str, Any]:
        """The defaults updated by ``overrides`` (aliases translated); unknown keywords raise TypeError."""
        resolved = dict(self.hyperparameters)
        given: dict[str, str] = {}  # real keyword -> the spelling the caller used
        accepted = self.accepted_keywords()
        for key, value in overrides.items():
            real = self.aliases.get(key, key)
            if real in given:
                raise TypeError(f"{self.name}: {key!r} and {given[real]!r} set the same hyper-parameter")
            if accepted is not None and real not in accepted:
                known = sorted(set(accepted) | set(self.aliases))
                raise TypeError(f"{self.name} ({self.display_name}) got an unexpected keyword argument "
                                f"{key!r}; accepted: {', '.join(known)}")
            given[real] = key
            resolved[real] = value
        return resolved

    def create(self, params: Iterable[Any], **overrides: Any) -> Optimizer:
        """Build the optimizer on ``params`` with the defaults overridden by ``overrides``."""
        return self.constructor(params, **self.resolve(**overrides))


def _spec(name: str, display: str, ctor: Callable[..., Optimizer], reference: str,
          aliases: Mapping[str, str] | None = None, **hp: Any) -> BaselineSpec:
    return BaselineSpec(name, display, ctor, hp, aliases or {}, reference)


BASELINES: Mapping[str, BaselineSpec] = MappingProxyType({s.name: s for s in (
    _spec("adam", "Adam", torch.optim.Adam,
          "Kingma & Ba, Adam: A Method for Stochastic Optimization, ICLR 2015", lr=1e-3),
    _spec("adamw", "AdamW", torch.optim.AdamW,
          "Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019",
          lr=1e-3, weight_decay=1e-2),
    _spec("sgd", "SGD", torch.optim.SGD, "SGD with (heavy-ball) momentum", lr=0.1, momentum=0.9),
    _spec("sgdn", "SGDN", torch.optim.SGD,
          "SGD with Nesterov momentum (Sutskever et al., ICML 2013)", lr=0.1, momentum=0.9, nesterov=True),
    _spec("radam", "RAdam", torch.optim.RAdam,
          "Liu et al., On the Variance of the Adaptive Learning Rate and Beyond, ICLR 2020", lr=1e-3),
    _spec("adabound", "AdaBound", AdaBound,
          "Luo et al., Adaptive Gradient Methods with Dynamic Bound of Learning Rate, ICLR 2019",
          lr=1e-3, final_lr=0.1, gamma=1e-3),
    _spec("adam-l4", "Adam-L4", L4,
          "Rolinek & Martius, L4: Practical loss-based stepsize adaptation for deep learning, NeurIPS 2018",
          aliases={"lr": "alpha"}, alpha=0.15, direction="adam"),
    _spec("prodigy", "Prodigy", ExternalOptimizer("prodigyopt", "Prodigy", "prodigy"),
          "Mishchenko & Defazio, Prodigy: An Expeditiously Adaptive Parameter-Free Learner, ICML 2024", lr=1.0),
    _spec("schedulefree-adamw", "Schedule-Free AdamW",
          ExternalOptimizer("schedulefree", "AdamWScheduleFree", "schedulefree-adamw"),
          "Defazio et al., The Road Less Scheduled, NeurIPS 2024", lr=0.0025),
    _spec("dadapt-adam", "D-Adapt Adam", ExternalOptimizer("dadaptation", "DAdaptAdam", "dadapt-adam"),
          "Defazio & Mishchenko, Learning-Rate-Free Learning by D-Adaptation, ICML 2023", lr=1.0),
    _spec("dog", "DoG", ExternalOptimizer("dog", "DoG", "dog"),
          "Ivgi, Hinder & Carmon, DoG is SGD's Best Friend: A Parameter-Free Dynamic Step Size Schedule, ICML 2023",
          lr=1.0, reps_rel=1e-6),
    _spec("ldog", "LDoG", ExternalOptimizer("dog", "LDoG", "ldog"),
          "Ivgi, Hinder & Carmon, DoG is SGD's Best Friend (layer-wise DoG), ICML 2023", lr=1.0, reps_rel=1e-6),
)})
"""Baselines by registry name (read-only)."""

_ALIASES = {"sgd-nesterov": "sgdn", "l4": "adam-l4", "l4adam": "adam-l4", "l4-adam": "adam-l4",
            "adam_l4": "adam-l4", "schedule-free-adamw": "schedulefree-adamw", "sf-adamw": "schedulefree-adamw",
            "d-adapt-adam": "dadapt-adam"}


def baseline_names() -> tuple[str, ...]:
    """The registry names: the paper's, in its order, then the learning-rate-free ones."""
    return tuple(BASELINES)


def get_baseline(name: str) -> BaselineSpec:
    """The :class:`BaselineSpec` for ``name`` (a registry or display name, any case; ``"l4"`` and
    ``"sgd-nesterov"`` are accepted too). Unknown names raise ValueError listing the known ones."""
    if not isinstance(name, str):
        raise ValueError(f"baseline name must be a string, got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in BASELINES:
        return BASELINES[key]
    for spec in BASELINES.values():
        if spec.display_name.lower() == key:
            return spec
    raise ValueError(f"Unknown baseline optimizer {name!r}; known: {', '.join(BASELINES)}")


def resolve_hyperparameters(name: str, **overrides: Any) -> dict[str, Any]:
    """The hyper-parameters :func:`create_baseline` would use (defaults updated by ``overrides``)."""
    return get_baseline(name).resolve(**overrides)


def create_baseline(name: str, params: Iterable[Any], **overrides: Any) -> Optimizer:
    """Build baseline ``name`` on ``params`` with the paper's defaults, overridden by ``overrides``.

    Unknown names raise ValueError (listing the known names); keywords the optimizer does not accept
    raise TypeError naming the keyword. For ``adam-l4``, ``lr`` is accepted as a synonym of ``alpha``.
    """
    return get_baseline(name).create(params, **overrides)


def requires_loss(optimizer: Any) -> bool:
    """True when ``optimizer.step`` must be given a closure returning the loss (e.g. :class:`L4`)."""
    return bool(getattr(optimizer, "requires_loss", False))
