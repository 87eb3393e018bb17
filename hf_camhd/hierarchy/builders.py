"""Hierarchy builders: turn a model into an :class:`~hf_camhd.hierarchy.tree.LRTree`.

:func:`build_hierarchy` picks a builder for the model (the first registered builder whose
``matches(model)`` is true, else the generic one), asks it for each parameter's block, and derives
layers and units from the module structure (spec §1). Builders for timm, transformers and the
models of :mod:`hf_camhd.models` register themselves through :func:`register_builder`; a builder only
says which block each parameter belongs to (and, rarely, a parameter's unit dimension).

Builders: timm models (:mod:`~hf_camhd.hierarchy.timm_builder`: stem / each block of the model's
``group_matcher`` / head), transformers models (:mod:`~hf_camhd.hierarchy.transformers_builder`: stem /
each transformer layer / head, both stacks of an encoder-decoder), LeNet-5 and MLP
(:mod:`~hf_camhd.hierarchy.models_builders`: one block per stage), and the generic builder for any
other module (a block per top-level child).

Choosing levels (Jie et al., CAM-HD): the paper's "filter level" for CNNs is the ``unit`` level — on
a conv layer a unit is one output channel (a filter) with its bias — so its two-level CNN setting is
``("global", "unit")``; its three-level MLP setting is ``("global", "layer", "parameter")``.
``("global", "block")`` learns one rate per residual block / transformer layer; any ordered subset of
``global, block, layer, unit, parameter`` starting with ``global`` is valid. The ``parameter`` level
adds one fp32 rate per scalar (the memory of one extra Adam moment).

Example::

    >>> import torch.nn as nn
    >>> from hf_camhd import build_hierarchy
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> tree = build_hierarchy(model, levels=("global", "block", "layer"))
    >>> tree.node_names("block")
    ['0', '2']
    >>> tree = build_hierarchy(model, ("global", "block"), blocks={"body": [r"^0\\."], "head": [r"^2\\."]})
    >>> tree.node_names("block")
    ['body', 'head']
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .tree import LRTree, ParamEntry, validate_levels

BlockFn = Callable[[nn.Module, Sequence[str]], Mapping[str, str]]
"""``(model, trainable parameter names) -> {parameter name: block name}``."""


@dataclass(frozen=True)
class HierarchyBuilder:
    """A registered builder: ``matches(model)`` says whether it applies; ``blocks(model, names)``
    maps every trainable parameter name to its block; ``unit_dims(model, names)`` optionally gives
    parameters whose output units are not along dim 0."""

    name: str
    matches: Callable[[nn.Module], bool]
    blocks: BlockFn
    unit_dims: Callable[[nn.Module, Sequence[str]], Mapping[str, int]] | None = None
    description: str = ""


_REGISTRY: dict[str, HierarchyBuilder] = {}


def register_builder(builder: HierarchyBuilder, *, overwrite: bool = False) -> HierarchyBuilder:
    """Add ``builder`` to the registry (checked in registration order before the generic builder)."""
    if builder.name in _REGISTRY and not overwrite:
        raise ValueError(f"A hierarchy builder named {builder.name!r} is already registered; "
                         "pass overwrite=True to replace it")
    _REGISTRY[builder.name] = builder
    return builder


def list_builders() -> list[str]:
    """Names of the registered builders, plus ``"generic"``."""
    _load_builtin_builders()
    return [*list(_REGISTRY), "generic"]


_BUILTINS_LOADED = False


def _load_builtin_builders() -> None:
    """Import the modules that register builders for timm, transformers and our own models.

    Each import is optional: a missing library simply leaves its builder out.
    """
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib
    for mod in ("hf_camhd.hierarchy.models_builders", "hf_camhd.hierarchy.timm_builder",
                "hf_camhd.hierarchy.transformers_builder"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # the builder module or the library it needs is absent
            if err.name not in (mod, "timm", "transformers"):
                raise


# ------------------------------------------------------------------------------------------ generic
def owning_layer(name: str) -> str:
    """The layer of a tensor: its owning module's path, or the tensor's own name at the root."""
    return name.rsplit(".", 1)[0] if "." in name else name


def generic_blocks(model: nn.Module | None, names: Sequence[str]) -> dict[str, str]:
    """Block = the top-level child module holding the tensor (a root-owned tensor is its own block)."""
    return {n: n.split(".", 1)[0] for n in names}


def module_unit_dims(model: nn.Module, names: Sequence[str]) -> dict[str, int]:
    """Unit dimensions that differ from 0: GPT-2-style ``Conv1D`` stores its weight as [in, out]."""
    out = {}
    modules = dict(model.named_modules())
    for n in names:
        mod = modules.get(owning_layer(n)) if "." in n else None
        if mod is not None and type(mod).__name__ == "Conv1D" and n.endswith(".weight") and hasattr(mod, "nf"):
            w = mod.weight
            if w.ndim == 2 and w.shape[1] == mod.nf:
                out[n] = 1
    return out


def custom_blocks(names: Sequence[str], blocks: Mapping[str, Iterable[str]],
                  fallback: Mapping[str, str]) -> dict[str, str]:
    """Assign blocks from ``{"block name": [regex, ...]}`` (``re.search`` on parameter names).

    A regex that matches no parameter, or a parameter matched by two blocks, raises ``ValueError``.
    Parameters no regex matches keep their ``fallback`` block.
    """
    assigned: dict[str, str] = {}
    for block, patterns in blocks.items():
        if isinstance(patterns, str):
            patterns = [patterns]
        for pat in patterns:
            try:
                rx = re.compile(pat)
            except re.error as err:
                raise ValueError(f"Invalid blocks regex {pat!r} for block {block!r}: {err}") from None
            hits = [n for n in names if rx.search(n)]
            if not hits:
                raise ValueError(f"Invalid blocks: regex {pat!r} of block {block!r} matches no trainable "
                                 "parameter")
            for n in hits:
                if n in assigned and assigned[n] != block:
                    raise ValueError(f"Invalid blocks: parameter {n!r} is matched by block {assigned[n]!r} and "
                                     f"by regex {pat!r} of block {block!r}; each parameter must be in one block")
                assigned[n] = block
    return {n: assigned.get(n, fallback[n]) for n in names}


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``model.named_parameters()`` without frozen tensors (tied tensors appear once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def entries_from_names(names: Sequence[str], shapes: Sequence[Sequence[int]], *,
                       blocks: Mapping[str, str] | None = None,
                       unit_dims: Mapping[str, int] | None = None,
                       layers: Mapping[str, str] | None = None) -> list[ParamEntry]:
    """Tree entries from parameter names and shapes (layer = owning module path)."""
    unit_dims = unit_dims or {}
    return [ParamEntry(n, tuple(int(s) for s in shape),
                       (layers or {}).get(n, owning_layer(n)),
                       None if blocks is None else blocks[n], int(unit_dims.get(n, 0)))
            for n, shape in zip(names, shapes)]


def select_builder(model: nn.Module, builder: str | None = None) -> HierarchyBuilder | None:
    """The registered builder for ``model`` (``None`` means the generic builder)."""
    _load_builtin_builders()
    if builder is not None:
        if builder == "generic":
            return None
        if builder not in _REGISTRY:
            raise ValueError(f"Unknown builder {builder!r}; expected one of {', '.join(list_builders())}")
        return _REGISTRY[builder]
    for b in _REGISTRY.values():
        if b.matches(model):
            return b
    return None


def build_hierarchy(model: nn.Module, levels: Iterable[str] | str = ("global", "layer"), *,
                    builder: str | None = None,
                    blocks: Mapping[str, Iterable[str]] | None = None) -> LRTree:
    """Build the learning-rate tree of ``model`` for ``levels`` (spec §1).

    Args:
        model: any ``nn.Module``. Frozen parameters are left out; tied parameters appear once.
        levels: an ordered subset of ``global, block, layer, unit, parameter`` (``global`` first), as a
            tuple or a comma-separated string.
        builder: force a builder by name (see :func:`list_builders`); default: detect from the model.
        blocks: a custom block grouping ``{"block name": ["regex", ...]}`` matched with ``re.search``
            against parameter names; parameters no regex matches keep the builder's block.

    Returns:
        An :class:`LRTree` whose entries follow ``model.named_parameters()`` order.
    """
    levels = validate_levels(levels)
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    named = trainable_named_parameters(model)
    if not named:
        raise ValueError(f"Invalid params: the model ({type(model).__name__}) has no trainable parameters (none, or "
                         "all frozen with requires_grad=False); pass a model with parameters to train")
    names = [n for n, _ in named]
    chosen = select_builder(model, builder)
    block_map = dict(chosen.blocks(model, names)) if chosen is not None else generic_blocks(model, names)
    missing = [n for n in names if n not in block_map]
    if missing:
        raise ValueError(f"Builder {chosen.name if chosen else 'generic'!r} gave no block for parameter {missing[0]!r}")
    if blocks is not None:
        block_map = custom_blocks(names, blocks, block_map)
    elif chosen is None and "block" in levels and len(set(block_map.values())) == 1 and len(named) > 1:
        warnings.warn(
            f"build_hierarchy: every parameter of {type(model).__name__} lands in one block "
            f"({next(iter(block_map.values()))!r}), so the block level equals the global level. Pass a "
            "custom grouping, e.g. build_hierarchy(model, levels, blocks={'stem': [r'^embed'], "
            "'body': [r'^layers\\.'], 'head': [r'^head']})", stacklevel=2)
    unit_dims = module_unit_dims(model, names)
    if chosen is not None and chosen.unit_dims is not None:
        unit_dims.update(chosen.unit_dims(model, names))
    entries = entries_from_names(names, [tuple(p.shape) for _, p in named], blocks=block_map, unit_dims=unit_dims)
    return LRTree(entries, levels, module=model)


def tree_from_named_parameters(named: Iterable[tuple[str, torch.Tensor]],
                               levels: Iterable[str] | str = ("global", "layer")) -> LRTree:
    """A tree from ``(name, tensor)`` pairs alone: layer = owning module path, block = first name
    component (the top-level child module). Frozen tensors are left out."""
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError("Invalid params: empty parameter list (or every parameter is frozen)")
    names = [n for n, _ in named]
    return LRTree(entries_from_names(names, [tuple(p.shape) for _, p in named],
                                     blocks=generic_blocks(None, names)), levels)


def tree_from_plain_params(params: Sequence[torch.Tensor], levels: Iterable[str] | str = ("global", "layer"),
                           names: Sequence[str] | None = None) -> LRTree:
    """A tree for unnamed tensors: every tensor is its own layer; there is no block level."""
    levels = validate_levels(levels)
    if "block" in levels:
        raise ValueError("Invalid levels: 'block' requested for plain params (no module structure); pass the "
                         "model or model.named_parameters(), or drop 'block' from levels")
    if not params:
        raise ValueError("Invalid params: empty parameter list")
    names = list(names) if names is not None else [f"param{i}" for i in range(len(params))]
    entries = [ParamEntry(n, tuple(p.shape), n, None, 0) for n, p in zip(names, params)]
    return LRTree(entries, levels)

