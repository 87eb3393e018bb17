"""CAM-HD optimizers in timm's optimizer registry: ``timm.optim.create_optimizer_v2(model, opt="camhdadam", ...)``.

Registered names (timm records, :class:`timm.optim.OptimInfo`; timm names cannot contain ``_``:
``opt="camhd_adam"`` would be parsed as timm's ``adam`` with a ``camhd`` prefix):

| timm name    | optimizer                          |
|--------------|------------------------------------|
| `camhdadam`  | :class:`~hf_camhd.CAMHDAdam`       |
| `camhdadamw` | :class:`~hf_camhd.CAMHDAdamW`      |
| `camhdsgd`   | :class:`~hf_camhd.CAMHDSGD` (momentum, timm's default 0.9) |
| `camhdsgdn`  | :class:`~hf_camhd.CAMHDSGD` with Nesterov momentum |

``import hf_camhd`` registers them (as soon as timm's optimizer factory is imported; nothing happens without
timm), and so does importing this module.

timm hands an optimizer class its parameter groups (weight decay off for biases and norms, layer decay) and
the extra keyword arguments of ``create_optimizer_v2`` — not the model. The learning-rate tree therefore
comes in through those keyword arguments: ``tree=build_hierarchy(model, levels)`` (timm models: stem / each
block / head) names timm's groups and gives the block level; timm's own groups are kept::

    >>> import timm, torch
    >>> import hf_camhd
    >>> from timm.optim import create_optimizer_v2
    >>> model = timm.create_model("resnet18", num_classes=10)
    >>> tree = hf_camhd.build_hierarchy(model, ("global", "block", "layer"))
    >>> opt = create_optimizer_v2(model, opt="camhdadam", lr=1e-3, weight_decay=0.05, tree=tree,
    ...                           hypergrad_lr=0.01)
    >>> type(opt).__name__, opt.tree.num_nodes("block"), sorted({g["weight_decay"] for g in opt.param_groups})
    ('CAMHDAdam', 10, [0.0, 0.05])

:func:`create_optimizer_v2` here is timm's with that one step done for you (``levels=`` instead of ``tree=``),
and it is what :mod:`hf_camhd.integrations.timm_train` gives timm's ``train.py``. A ``param_group_fn`` that
returns named groups (``(name, tensor)`` pairs) works too. Without a tree or names the optimizer sees
anonymous tensors: one ``layer`` node per tensor, and no ``block`` level (asking for one raises an error
that says how to pass the tree).

Other keyword arguments (``levels``, ``hypergrad_lr``, ``gamma_lr``, ``gamma``, ``decay_rate``, ...) go to the
CAM-HD optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .._extras import require

require("hf_camhd.integrations.timm", "timm")
# note: the factory module, not `timm.optim`: this module is imported while `timm.optim` itself may still be
# importing (the lazy registration runs right after `timm.optim._optim_factory` executes)
from timm.optim import _optim_factory as _timm_factory  # noqa: E402

from ..hierarchy import LRTree, build_hierarchy  # noqa: E402
from ..optim import CAMHDAdam, CAMHDAdamW, CAMHDOptimizer, CAMHDSGD  # noqa: E402
from . import register_timm_optimizers_lazily  # noqa: E402,F401  (its home is hf_camhd.integrations: no timm there)

__all__ = ["DEFAULT_LEVELS", "TIMM_NAMES", "create_optimizer_v2", "is_camhd_name", "register_timm_optimizers",
           "register_timm_optimizers_lazily"]

#: The levels :func:`create_optimizer_v2` builds when given a model and no ``levels``.
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


def is_camhd_name(opt: str) -> bool:
    """Whether timm's ``opt`` string names a CAM-HD optimizer (timm reads the part after the last ``_``, so
    ``"lookahead_camhdadam"`` does too).

        >>> is_camhd_name("camhdadamw"), is_camhd_name("lookahead_camhdsgd"), is_camhd_name("adamw")
        (True, True, False)
    """
    return isinstance(opt, str) and opt.lower().split("_")[-1] in _SPECS


def _is_named(item: Any) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)


def _name_groups(name: str, params: list, tree: LRTree) -> list[dict]:
    """timm's groups with every tensor named after the model the tree was built from."""
    model = tree.module
    if model is None:
        raise ValueError(f"Invalid tree for {name!r}: it is not bound to a live model (it was loaded from JSON, or "
                         "its model was deleted); pass tree=hf_camhd.build_hierarchy(model, levels)")
    # note: identity is only used here, once, to read names off the model; nothing is kept by id
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [dict(g) for g in params] if isinstance(params[0], Mapping) else [{"params": params}]
    for g in groups:
        ps = g["params"]
        ps = [ps] if not isinstance(ps, (list, tuple)) or _is_named(ps) else list(ps)
        named = []
        for p in ps:
            if _is_named(p):
                named.append(p)
            elif id(p) in names:
                named.append((names[id(p)], p))
            else:
                raise ValueError(f"Invalid tree for {name!r}: timm handed over a tensor of shape {tuple(p.shape)} "
                                 f"that is not a parameter of the {type(model).__name__} the tree was built from; "
                                 "build the tree from the model given to create_optimizer_v2")
        g["params"] = named
    return groups


def _make_factory(name: str):
    cls, fixed, description, *_ = _SPECS[name]

    def create(params: Any, levels=None, tree: LRTree | None = None, **kwargs) -> CAMHDOptimizer:
        if isinstance(params, (LRTree, nn.Module)):  # a param_group_fn returned the tree or the model itself
            return cls(params, levels=levels, tree=tree, **{**kwargs, **fixed})
        params = list(params)
        if not params:
            raise ValueError(f"Invalid params for {name!r}: empty parameter list")
        named = _is_named(params[0]) or (isinstance(params[0], Mapping) and any(
            _is_named(p) for p in (params[0].get("params") or [])))
        if tree is not None and not named:
            params = _name_groups(name, params, tree)
        elif tree is None and not named:
            levels = levels if levels is not None else ("global", "layer")
            if "block" in (levels.split(",") if isinstance(levels, str) else levels):
                raise ValueError(
                    f"Invalid levels for {name!r}: {levels!r} asks for the block level, but timm handed over "
                    "anonymous parameter groups, which carry no module structure. Pass the model's tree: "
                    f"create_optimizer_v2(model, opt={name!r}, tree=hf_camhd.build_hierarchy(model, levels), ...), "
                    "or use hf_camhd.integrations.timm.create_optimizer_v2(model, opt, levels=levels, ...)")
        return cls(params, levels=levels, tree=tree, **{**kwargs, **fixed})

    create.__name__ = create.__qualname__ = f"create_{name}"
    create.__doc__ = f"{description}. Built by timm's factory; see :mod:`hf_camhd.integrations.timm`."
    return create


def register_timm_optimizers() -> bool:
    """Register the CAM-HD optimizers with timm's optimizer registry (safe to call more than once); returns True.

        >>> from timm.optim import list_optimizers
        >>> register_timm_optimizers() and {"camhdadam", "camhdsgdn"} <= set(list_optimizers())
        True
    """
    registry = _timm_factory.default_registry
    known = getattr(registry, "_optimizers", {})
    for name, (_cls, _fixed, description, has_betas, has_momentum, has_eps) in _SPECS.items():
        if name in known:
            continue
        registry.register(_timm_factory.OptimInfo(name=name, opt_class=_make_factory(name), description=description,
                                                  has_eps=has_eps, has_momentum=has_momentum, has_betas=has_betas))
    return True


def create_optimizer_v2(model_or_params: Any, opt: str = "sgd", lr: float | None = None, weight_decay: float = 0.0,
                        momentum: float = 0.9, *, levels=None, tree: LRTree | None = None, **kwargs):
    """timm's ``create_optimizer_v2``, plus the learning-rate tree for the CAM-HD names.

    For ``camhdadam`` / ``camhdadamw`` / ``camhdsgd`` / ``camhdsgdn`` with a model (and neither ``tree`` nor a
    ``param_group_fn``), it builds ``tree = build_hierarchy(model, levels or DEFAULT_LEVELS)`` and hands it to
    timm; every other call goes to timm unchanged.

        >>> import timm
        >>> from hf_camhd.integrations.timm import create_optimizer_v2
        >>> model = timm.create_model("resnet18", num_classes=10)
        >>> opt = create_optimizer_v2(model, "camhdsgdn", lr=0.1, weight_decay=1e-4, levels="global,block")
        >>> opt.tree.node_names("block")[:3], opt.param_groups[0]["nesterov"]
        (['stem', 'layer1.0', 'layer1.1'], True)
    """
    register_timm_optimizers()
    if is_camhd_name(opt):
        if tree is None and isinstance(model_or_params, nn.Module) and kwargs.get("param_group_fn") is None:
            tree, levels = build_hierarchy(model_or_params, levels if levels is not None else DEFAULT_LEVELS), None
        kwargs.update({k: v for k, v in (("levels", levels), ("tree", tree)) if v is not None})
    elif levels is not None or tree is not None:
        raise ValueError(f"Invalid arguments for opt={opt!r}: levels= and tree= are CAM-HD settings; use one of "
                         f"{', '.join(TIMM_NAMES)}")
    return _timm_factory.create_optimizer_v2(model_or_params, opt, lr=lr, weight_decay=weight_decay,
                                             momentum=momentum, **kwargs)


register_timm_optimizers()
