"""Turning what a user hands a CAM-HD optimizer into param groups and a matching learning-rate tree.

Accepted: an ``nn.Module``; an ``LRTree`` built from a live module; ``model.named_parameters()``; plain
tensors; param-group dicts whose ``params`` are tensors or ``(name, tensor)`` pairs. Tensors with
``requires_grad=False`` stay in the groups and the tree, as in ``torch.optim`` (they take part in a step
only while they have a gradient, so unfreezing them trains them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..hierarchy import LRTree, build_hierarchy, tree_from_named_parameters, tree_from_plain_params
from ..hierarchy.builders import owning_layer
from ..hierarchy.tree import ParamEntry, validate_levels

DEFAULT_LEVELS = ("global", "layer")
EMPTY = ("Invalid params: empty parameter list; pass a model, model.named_parameters() or an iterable of tensors "
         "with at least one trainable tensor")


def resolve_params(params: Any, levels, tree: LRTree | None) -> tuple[list[dict], LRTree]:
    """The optimizer's param groups and its tree (in the groups' parameter order)."""
    if levels is not None:
        levels = validate_levels(levels)
    if tree is not None and not isinstance(tree, LRTree):
        raise ValueError(f"Invalid tree: expected an LRTree, e.g. tree=hf_camhd.build_hierarchy(model, levels), got "
                         f"{type(tree).__name__}")
    if params is None:
        raise TypeError("params argument given to the optimizer should be an nn.Module or an iterable of Tensors or "
                        "dicts, but got None")
    if isinstance(params, LRTree):
        if params.module is None:
            raise ValueError("Invalid params: this LRTree is not bound to a live model (it was loaded from JSON "
                             "or its model was deleted); pass the model with tree=..., e.g. CAMHDAdam(model, tree=tree)")
        tree = params if tree is None else tree
        params = params.module
    if isinstance(params, nn.Module):
        return _module_groups(params, levels, tree)
    if isinstance(params, torch.Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                        f"but got {torch.typename(params)}")
    items = list(params)
    if not items:
        raise ValueError(EMPTY)
    raw_groups = [dict(g) for g in items] if isinstance(items[0], Mapping) else [{"params": items}]
    groups, names, any_named, any_plain = _named_groups(raw_groups)
    flat = [p for g in groups for p in g["params"]]
    if not any(p.requires_grad for p in flat):
        raise ValueError(f"Invalid params: every parameter is frozen ({len(flat)} tensors with requires_grad=False); "
                         "set requires_grad=True on the tensors to train")
    if any_named and any_plain and tree is None:
        raise ValueError("Invalid params: mix of named and unnamed parameters; name all of them or none")
    if tree is not None:
        tree = tree.reordered(names) if tree.param_names != names else tree
        for e, p in zip(tree.entries, flat):
            if tuple(p.shape) != e.shape:
                raise ValueError(f"Invalid tree: parameter {e.name!r} has shape {tuple(p.shape)} but the tree says {e.shape}")
        _check_tree_levels(tree, levels)
    elif any_named:
        tree = tree_from_named_parameters(list(zip(names, flat)), levels or DEFAULT_LEVELS, include_frozen=True)
    else:
        tree = tree_from_plain_params(flat, levels or DEFAULT_LEVELS, names)
    if not any_named:
        for g in groups:
            del g["param_names"]  # plain tensors: keep torch's unnamed-group layout
    return groups, tree


def _module_groups(model: nn.Module, levels, tree: LRTree | None) -> tuple[list[dict], LRTree]:
    if tree is None:
        tree = build_hierarchy(model, levels or DEFAULT_LEVELS, include_frozen=True)
    named = dict(model.named_parameters())
    _check_tree_levels(tree, levels)
    return [{"params": [named[n] for n in tree.param_names], "param_names": tree.param_names}], tree


def _named_groups(raw_groups: list[dict]) -> tuple[list[dict], list[str], bool, bool]:
    """Split ``(name, tensor)`` pairs / ``param_names`` into tensors and names (``paramK`` where unnamed)."""
    groups, names = [], []
    any_named = any_plain = False
    for gi, g in enumerate(raw_groups):
        ps = g.get("params")
        if ps is None:
            raise ValueError(f"Invalid params: param group {gi} has no 'params' entry")
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        given = g.pop("param_names", None)
        kept, kept_names = [], []
        for k, item in enumerate(ps):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, p = item
            else:
                p, name = item, (given[k] if given is not None else None)
            any_named |= name is not None
            any_plain |= name is None
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
            kept.append(p)
            kept_names.append(name if name is not None else f"param{len(names) + len(kept_names)}")
        if kept:
            groups.append({**g, "params": kept, "param_names": kept_names})
            names.extend(kept_names)
    if not groups:
        raise ValueError(EMPTY)
    return groups, names, any_named, any_plain


def _check_tree_levels(tree: LRTree, levels) -> None:
    if levels is not None and tuple(levels) != tree.levels:
        raise ValueError(f"Invalid levels {tuple(levels)!r}: the tree given has levels {tree.levels!r}; "
                         "pass levels=None or a tree built with the same levels")


def extend_tree(tree: LRTree, names: list[str], tensors: list[torch.Tensor], block: str) -> LRTree:
    """``tree`` with new entries for ``tensors`` appended (``add_param_group``): each tensor joins a new layer
    node (its owning module's path, or its own name when that layer is already in the tree) and, where the
    tree has block names, the new block ``block``. Existing nodes keep their indices."""
    taken = set(tree.param_names)
    layers = {e.layer for e in tree.entries}
    has_blocks = any(e.block is not None for e in tree.entries)
    new = []
    for name, p in zip(names, tensors):
        base, k = name, 1
        while name in taken:
            name, k = f"{base}#{k}", k + 1
        taken.add(name)
        layer = owning_layer(name)
        new.append(ParamEntry(name, tuple(p.shape), name if layer in layers else layer,
                              block if has_blocks else None, 0))
    return LRTree([*tree.entries, *new], tree.levels, module=tree.module)


def names_for(tensors: list[torch.Tensor], tree: LRTree) -> list[str]:
    """Names of tensors added without names: their names in the tree's model when it is alive, else
    ``param{k}`` numbered on from the tree's tensors (then each is its own layer, as plain tensors are)."""
    module = tree.module
    known = {}
    if module is not None:
        for n, p in module.named_parameters(remove_duplicate=False):
            known.setdefault(id(p), n)
    start = len(tree.entries)
    return [known.get(id(p), f"param{start + i}") for i, p in enumerate(tensors)]
