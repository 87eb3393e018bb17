"""The optimizer registry: every named CAM-HD variant is a record (class + fixed settings), as in timm.

    >>> import torch
    >>> from hf_camhd import create_optimizer, list_optimizers
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = create_optimizer(model, "adam-camhd", lr=1e-3, levels=("global", "layer"))
    >>> "sgdn-camhd" in list_optimizers()
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .camhd import CAMHDAdam, CAMHDAdamW, CAMHDOptimizer, CAMHDSGD
from .schedule_free import CAMHDScheduleFreeAdamW


@dataclass(frozen=True)
class OptimInfo:
    """A registered optimizer: the class, the settings that define the variant (which the caller may
    not override) and its defaults (which the caller may)."""

    name: str
    cls: type[CAMHDOptimizer]
    fixed: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    defaults: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    description: str = ""


def _info(name, cls, description, fixed=None, defaults=None) -> OptimInfo:
    return OptimInfo(name, cls, MappingProxyType(dict(fixed or {})), MappingProxyType(dict(defaults or {})),
                     description)


_GLOBAL_ONLY = {"levels": ("global",), "hypergrad_rule": "additive"}  # Baydin et al.'s HD is the additive rule
_REGISTRY: dict[str, OptimInfo] = {
    info.name: info
    for info in (
        _info("sgd-camhd", CAMHDSGD, "SGD with CAM-HD rates"),
        _info("sgdm-camhd", CAMHDSGD, "SGD with momentum 0.9 and CAM-HD rates", defaults={"momentum": 0.9}),
        _info("sgdn-camhd", CAMHDSGD, "SGD with Nesterov momentum and CAM-HD rates",
              fixed={"nesterov": True}, defaults={"momentum": 0.9}),
        _info("adam-camhd", CAMHDAdam, "Adam with CAM-HD rates"),
        _info("adamw-camhd", CAMHDAdamW, "AdamW with CAM-HD rates"),
        _info("sfadamw-camhd", CAMHDScheduleFreeAdamW, "Schedule-Free AdamW with CAM-HD rates (call train() / eval())"),
        _info("sgd-hd", CAMHDSGD, "Baydin et al.'s SGD-HD (global-only tree)", fixed=_GLOBAL_ONLY),
        _info("sgdn-hd", CAMHDSGD, "SGD-HD with Nesterov momentum (global-only tree)",
              fixed={**_GLOBAL_ONLY, "nesterov": True}, defaults={"momentum": 0.9}),
        _info("adam-hd", CAMHDAdam, "Baydin et al.'s Adam-HD (global-only tree)", fixed=_GLOBAL_ONLY),
        _info("adamw-hd", CAMHDAdamW, "Adam-HD with decoupled weight decay (global-only tree)", fixed=_GLOBAL_ONLY),
    )
}


def list_optimizers() -> list[str]:
    """Names accepted by :func:`create_optimizer`."""
    return list(_REGISTRY)


def get_optimizer_info(name: str) -> OptimInfo:
    """The registry record for ``name`` (case-insensitive; ``_`` accepted for ``-``)."""
    key = name.lower().replace("_", "-")
    if key not in _REGISTRY:
        raise ValueError(f"Unknown optimizer {name!r}; expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def create_optimizer(model_or_params: Any, name: str, **kwargs) -> CAMHDOptimizer:
    """Build the registered optimizer ``name`` over a model (or params), e.g. ``"adam-camhd"``.

    Keyword arguments go to the optimizer class; a variant's fixed settings (e.g. ``levels`` of the
    global-only ``*-hd`` variants, ``nesterov`` of ``sgdn-*``) cannot be overridden.
    """
    info = get_optimizer_info(name)
    clash = sorted(k for k in kwargs if k in info.fixed and kwargs[k] != info.fixed[k])
    if clash:
        raise ValueError(f"Invalid {clash[0]} for {info.name!r}: {kwargs[clash[0]]!r}; this variant fixes "
                         f"{clash[0]}={info.fixed[clash[0]]!r} (choose another optimizer name to change it)")
    return info.cls(model_or_params, **{**info.defaults, **kwargs, **info.fixed})
