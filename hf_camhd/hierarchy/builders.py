"""Hierarchy builders: turn a model into an :class:`~hf_camhd.hierarchy.tree.LRTree`.

:func:`build_hierarchy` picks a builder for the model (the first registered builder whose
``matches(model)`` is true, else the generic one), asks it for each parameter's block, and derives
layers and units from the module structure (docs/algorithm.md §1). Builders for timm, transformers and the
models of :mod:`hf_camhd.models` register themselves through :func:`register_builder`; a builder only
says which block each parameter belongs to (and, rarely, a parameter's unit dimension).

Builders: timm models (:mod:`~hf_camhd.hierarchy.timm_builder`: stem / each block of the model's
``group_matcher`` / head), transformers models (:mod:`~hf_camhd.hierarchy.transformers_builder`: stem /
each transformer layer / head, both stacks of an encoder-decoder), LeNet-5 and MLP
(:mod:`~hf_camhd.hierarchy.models_builders`: one block per stage), and the generic builder for any
other module: its repeated stacks (an ``nn.ModuleList`` / ``nn.Sequential`` of two or more modules of one class
holding most of the parameters, at any depth — torch's ``nn.TransformerEncoder``, a nanoGPT-style ``h``) give
one block per layer, with ``stem`` before and ``head`` after them (:func:`repeated_stacks`); a model
without one gets a block per top-level child.

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
    >>> layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    >>> net = nn.Sequential(nn.Embedding(10, 16), nn.TransformerEncoder(layer, num_layers=3), nn.Linear(16, 2))
    >>> build_hierarchy(net, ("global", "block")).node_names("block")
    ['stem', '1.layers.0', '1.layers.1', '1.layers.2', 'head']
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


def top_level_blocks(names: Sequence[str]) -> dict[str, str]:
    """Block = the top-level child module holding the tensor (a root-owned tensor is its own block)."""
    return {n: n.split(".", 1)[0] for n in names}


def _inside(path: str, outer: str) -> bool:
    """Whether module ``path`` is ``outer`` or lies inside it (``""`` is the root, which holds everything)."""
    return outer == "" or path == outer or path.startswith(outer + ".")


def repeated_stacks(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Paths of the layers of the model's repeated stacks, in parameter order; ``[]`` when it has none.

    A *stack* is an ``nn.ModuleList`` or ``nn.Sequential`` (at any depth; the model itself included) whose
    children that hold trainable parameters are two or more modules of one class — a transformer's layers,
    a ResNet stage's blocks, an MLP's ``Sequential(Linear, ReLU, Linear, ...)``. Stacks are taken largest first
    (trainable parameters of their layers), skipping any inside or around one already taken, and leaving out
    stacks of much smaller modules (mean layer under 1/4 of the largest stack's: a pair of output heads, two
    convolutions of a stem). They count only when their layers together hold more than half of the model's
    trainable parameters — two stacks (an encoder's and a decoder's) both count.

        >>> from torch import nn
        >>> model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
        ...                        dim_feedforward=16, batch_first=True)
        >>> repeated_stacks(model, [n for n, _ in model.named_parameters()])
        ['encoder.layers.0', 'encoder.layers.1', 'decoder.layers.0', 'decoder.layers.1']
    """
    params = dict(model.named_parameters())
    size: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        for k in range(len(parts)):  # every enclosing module ("" is the root)
            key = ".".join(parts[:k])
            size[key] = size.get(key, 0) + params[n].numel()
    total = size.get("", 0)
    candidates = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        layers = [(f"{path}.{c}" if path else c, child) for c, child in module.named_children()
                  if size.get(f"{path}.{c}" if path else c, 0)]
        if len(layers) >= 2 and len({type(child) for _, child in layers}) == 1:
            candidates.append((path, [p for p, _ in layers], sum(size[p] for p, _ in layers)))
    taken: list[tuple[str, list[str], int]] = []
    for path, layers, n in sorted(candidates, key=lambda c: -c[2]):
        if any(_inside(path, t) or _inside(t, path) for t, _, _ in taken):
            continue
        if taken and n / len(layers) < taken[0][2] / len(taken[0][1]) / 4:
            continue
        taken.append((path, layers, n))
    if 2 * sum(n for _, _, n in taken) <= total:
        return []
    position = {n: i for i, n in enumerate(params)}
    first = {lp: min(position[n] for n in names if _inside(n, lp)) for _, layers, _ in taken for lp in layers}
    return sorted(first, key=first.get)


def generic_blocks(model: nn.Module | None, names: Sequence[str]) -> dict[str, str]:
    """The generic builder: the model's repeated stacks (:func:`repeated_stacks`) give one block per layer, with
    ``stem`` / ``head`` around them (:func:`blocks_from_layers`); without a stack (or a model) the block is the
    top-level child module holding the tensor."""
    stacks = repeated_stacks(model, names) if model is not None else []
    return blocks_from_layers(model, names, stacks) if stacks else top_level_blocks(names)


# ------------------------------------------------------------------------------------------ stacks of layers
def _layer_of(name: str, layers: set[str]) -> str | None:
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:k])
        if p in layers:
            return p
    return None


def _is_embedding(name: str) -> bool:
    """Whether a tensor belongs to an embedding module (``embeddings``, ``embed_tokens``,
    ``embed_positions``, ``layernorm_embedding``; not GPT-NeoX's ``embed_out`` LM head)."""
    return any("embedding" in c.lower() or c.startswith(("embed_tokens", "embed_positions"))
               for c in name.split(".")[:-1])


def _towers(stacks: list[str]) -> dict[str, str]:
    """Each stack path's tower: the common prefix of all stack paths plus the stack's next component."""
    split = [s.split(".") for s in stacks]
    common = 0
    while all(len(p) > common for p in split) and len({p[common] for p in split}) == 1:
        common += 1
    return {s: ".".join(p[:common + 1]) for s, p in zip(stacks, split)}


def blocks_from_layers(model: nn.Module, names: Sequence[str], layers: Sequence[str]) -> dict[str, str]:
    """Blocks around a model's stacks of layers: each layer (a module path) is a block; what is registered before
    the first layer is ``"stem"``, after the last one ``"head"``; between two stacks a tensor goes to the tower
    of the stack it sits under (``"<tower>.head"`` / ``"<tower>.stem"``; the tower is the stack's path down to
    the first component where the stacks' paths differ). An embedding registered after its layers stays in its
    tower's stem. There is no ``stem`` (``head``) block when nothing comes before (after) the layers.

    Positions are the model's full ``named_parameters()`` order (registration order, not forward order), so
    freezing a tensor never moves another one to a different block. Used by the generic builder and by the
    transformers builder (:mod:`~hf_camhd.hierarchy.transformers_builder`, which documents the cases).
    """
    layer_set = set(layers)
    all_names = [n for n, _ in model.named_parameters()]  # positions independent of freezing
    pos = {n: i for i, n in enumerate(all_names)}
    layer_of = {n: _layer_of(n, layer_set) for n in all_names}
    stacks: list[str] = []  # the containers of the layers (e.g. "encoder.block"), in order
    for lp in layers:
        parent = lp.rsplit(".", 1)[0] if "." in lp else ""
        if parent not in stacks:
            stacks.append(parent)
    stack_of_layer = {lp: (lp.rsplit(".", 1)[0] if "." in lp else "") for lp in layers}
    # first / last parameter position of each stack
    span: dict[str, list[int]] = {}
    for n in all_names:
        lp = layer_of[n]
        if lp is not None:
            s = span.setdefault(stack_of_layer[lp], [pos[n], pos[n]])
            s[0], s[1] = min(s[0], pos[n]), max(s[1], pos[n])
    if not span:  # the layers hold no parameters at all
        return top_level_blocks(names)
    first = min(s[0] for s in span.values())
    last = max(s[1] for s in span.values())
    towers = _towers([s for s in stacks if s in span]) if len(span) > 1 else {}
    ordered = sorted(span, key=lambda s: span[s][0])

    first_tower = towers.get(ordered[0]) if towers else None

    def stem_of(n: str) -> str:
        """The stem on the side of ``n``'s tower (for an embedding registered after its layers)."""
        tower = next((t for t in dict.fromkeys(towers.values()) if n.startswith(t + ".")), None)
        return "stem" if tower is None or tower == first_tower else f"{tower}.stem"

    out: dict[str, str] = {}
    for n in names:
        lp = layer_of[n]
        if lp is not None:
            out[n] = lp
            continue
        p = pos[n]
        if p < first:
            block = "stem"
        elif p > last:
            block = stem_of(n) if _is_embedding(n) else "head"
        elif any(a < p < b for a, b in span.values()) or not towers:
            # among one stack's layers (layers not in one list): the layer before
            block = next((layer_of[m] for m in reversed(all_names[:p]) if layer_of[m] is not None), "stem")
        else:
            # note: between two stacks; the tower the tensor sits under decides
            prev_stack = max((s for s in ordered if span[s][1] < p), key=lambda s: span[s][1])
            next_stack = min((s for s in ordered if span[s][0] > p), key=lambda s: span[s][0])
            if n.startswith(towers[prev_stack] + "."):
                block = stem_of(n) if _is_embedding(n) else f"{towers[prev_stack]}.head"
            else:  # under the next stack's tower, or under none
                block = f"{towers[next_stack]}.stem"
        out[n] = block
    return out


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
                    blocks: Mapping[str, Iterable[str]] | None = None,
                    include_frozen: bool = False) -> LRTree:
    """Build the learning-rate tree of ``model`` for ``levels`` (docs/algorithm.md §1).

    Args:
        model: any ``nn.Module``. Frozen parameters are left out (unless ``include_frozen``); tied
            parameters appear once.
        levels: an ordered subset of ``global, block, layer, unit, parameter`` (``global`` first), as a
            tuple or a comma-separated string.
        builder: force a builder by name (see :func:`list_builders`); default: detect from the model.
        blocks: a custom block grouping ``{"block name": ["regex", ...]}`` matched with ``re.search``
            against parameter names; parameters no regex matches keep the builder's block.
        include_frozen: keep tensors with ``requires_grad=False`` in the tree (what a CAM-HD optimizer
            built from a model does, so that unfreezing them later trains them).

    Returns:
        An :class:`LRTree` whose entries follow ``model.named_parameters()`` order.
    """
    levels = validate_levels(levels)
    if not isinstance(model, nn.Module):
        raise ValueError(f"Invalid model: expected an nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters()) if include_frozen else trainable_named_parameters(model)
    if not any(p.requires_grad for _, p in named):
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
                               levels: Iterable[str] | str = ("global", "layer"), *,
                               include_frozen: bool = False) -> LRTree:
    """A tree from ``(name, tensor)`` pairs alone: layer = owning module path, block = first name
    component (the top-level child module). Frozen tensors are left out unless ``include_frozen``."""
    named = [(n, p) for n, p in named if include_frozen or p.requires_grad]
    if not named:
        raise ValueError("Invalid params: empty parameter list (or every parameter is frozen)")
    names = [n for n, _ in named]
    return LRTree(entries_from_names(names, [tuple(p.shape) for _, p in named],
                                     blocks=top_level_blocks(names)), levels)


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

