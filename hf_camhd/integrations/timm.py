"""CAM-HD optimizers in timm's optimizer factory: ``timm.optim.create_optimizer_v2(model, opt="camhdadam", ...)``.

Registered names (timm names cannot contain ``_``; ``opt="camhd_adam"`` would be parsed as timm's
``adam`` with a ``camhd`` prefix):

| timm name    | optimizer                          |
|--------------|------------------------------------|
| `camhdadam`  | :class:`~hf_camhd.CAMHDAdam`       |
| `camhdadamw` | :class:`~hf_camhd.CAMHDAdamW`      |
| `camhdsgd`   | :class:`~hf_camhd.CAMHDSGD` (momentum, timm's default 0.9) |
| `camhdsgdn`  | :class:`~hf_camhd.CAMHDSGD` with Nesterov momentum |

``import hf_camhd`` registers them (lazily: nothing happens when timm is not installed). The hierarchy is
built from the model with :func:`hf_camhd.build_hierarchy` (timm models: stem / each block / head), and
timm's own parameter groups (weight decay off for biases and norms, layer decay) are kept::

    >>> import timm, hf_camhd
    >>> from timm.optim import create_optimizer_v2
    >>> model = timm.create_model("resnet18", num_classes=10)
    >>> opt = create_optimizer_v2(model, opt="camhdadam", lr=1e-3, weight_decay=0.05,
    ...                           levels=("global", "block", "layer"), hypergrad_lr=1e-8)   # doctest: +SKIP

Extra keyword arguments of ``create_optimizer_v2`` (``levels``, ``hypergrad_lr``, ``gamma_lr``, ``gamma``,
``decay_rate``, ...) go to the CAM-HD optimizer. ``levels`` defaults to ``("global", "block", "layer")``
(``("global", "layer")`` for plain parameters, which carry no module structure).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

from torch import nn

from ..hierarchy import build_hierarchy
from ..optim import CAMHDAdam, CAMHDAdamW, CAMHDOptimizer, CAMHDSGD

__all__ = ["TIMM_NAMES", "register_timm_optimizers", "register_timm_optimizers_lazily"]

DEFAULT_LEVELS = ("global", "block", "layer")

_SPECS = {
    # timm name: (class, fixed kwargs, description, has_betas, has_momentum, has_eps)
    "camhdadam": (CAMHDAdam, {}, "Adam with CAM-HD learned multi-level learning rates (hf_camhd)", True, False, True),
    "camhdadamw": (CAMHDAdamW, {}, "AdamW with CAM-HD learned multi-level learning rates (hf_camhd)", True, False,
                   True),
    "camhdsgd": (CAMHDSGD, {}, "SGD with momentum and CAM-HD learned multi-level learning rates (hf_camhd)", False,
                 True, False),
    "camhdsgdn": (CAMHDSGD, {"nesterov": True},
                  "SGD with Nesterov momentum and CAM-HD learned multi-level learning rates (hf_camhd)", False, True,
                  False),
}
TIMM_NAMES = tuple(_SPECS)


def _model_from_caller(params: list) -> nn.Module | None:
    """The model handed to timm's ``create_optimizer`` (a local of the calling frame), if it owns ``params``.

    note: timm gives an optimizer class only the param groups it built; the model is found in timm's frame
    and checked to own exactly these tensors (never trusted blindly), so the tree gets real names and blocks.
    """
    wanted = {id(p) for g in params for p in (g["params"] if isinstance(g, dict) else [g])}
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            break
        model = frame.f_locals.get("model_or_params")
        if isinstance(model, nn.Module):
            owned = {id(p) for p in model.parameters()}
            if wanted <= owned:
                return model
        frame = frame.f_back
    return None


def _make_factory(name: str):
    cls, fixed, description, *_ = _SPECS[name]

    def create(params: Any, levels=None, tree=None, **kwargs) -> CAMHDOptimizer:
        params = list(params)
        model = _model_from_caller(params) if params and isinstance(params[0], dict) else None
        if model is not None:
            names = {id(p): n for n, p in model.named_parameters()}
            groups = [{**g, "params": [(names[id(p)], p) for p in g["params"]]} for g in params]
            tree = tree if tree is not None else build_hierarchy(model, levels or DEFAULT_LEVELS)
            return cls(groups, tree=tree, **{**kwargs, **fixed})
        # plain params (not from a model): one layer per tensor, no block level
        levels = (levels or ("global", "layer")) if tree is None else None
        return cls(params, levels=levels, tree=tree, **{**kwargs, **fixed})

    create.__name__ = create.__qualname__ = f"create_{name}"
    create.__doc__ = f"{description}. Built by timm's factory; see :mod:`hf_camhd.integrations.timm`."
    return create


def register_timm_optimizers() -> bool:
    """Register the CAM-HD optimizers with timm's optimizer registry. Returns ``False`` when timm is not
    installed (then nothing is registered); safe to call more than once."""
    try:
        from timm.optim._optim_factory import OptimInfo, default_registry
    except ImportError:
        return False
    for name, (_cls, _fixed, description, has_betas, has_momentum, has_eps) in _SPECS.items():
        if name in getattr(default_registry, "_optimizers", {}):
            continue
        default_registry.register(OptimInfo(name=name, opt_class=_make_factory(name), description=description,
                                            has_eps=has_eps, has_momentum=has_momentum, has_betas=has_betas))
    return True


_TIMM_FACTORY = "timm.optim._optim_factory"


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
            register_timm_optimizers()

        spec.loader.exec_module = exec_then_register
        return spec


def register_timm_optimizers_lazily() -> None:
    """What ``import hf_camhd`` calls: register now if timm's optimizer factory is already imported, else
    when it gets imported (timm itself is not imported here, and nothing happens without timm)."""
    if _TIMM_FACTORY in sys.modules:
        register_timm_optimizers()
    elif importlib.util.find_spec("timm") is not None and not any(isinstance(f, _RegisterOnImport)
                                                                   for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
