"""The learning-rate tree (the "α tree"): which scalars share a learning rate at each level.

An :class:`LRTree` is plain data: parameter names, shapes and the node each parameter belongs to at
every level. It holds no tensors, so it saves to JSON, goes into optimizer checkpoints, and can be
compared with the tree of another model. Node membership follows docs/algorithm.md §1 exactly:

* ``global``: one node holding every trainable scalar.
* ``block``: given by a hierarchy builder (a residual block, a transformer layer, the stem, the head).
* ``layer``: the module that owns the tensor (its dotted name minus the last component), so a
  module's weight and bias share a node; a tensor owned directly by the root module is its own layer.
* ``unit``: output unit ``i`` of a layer is index ``i`` along the unit dimension (dim 0, or dim 1 for
  GPT-2's ``Conv1D``) of the layer's weight, together with element ``i`` of each 1-D tensor of the
  layer with that many elements (a conv filter with its bias, a linear row with its bias, a norm's
  scale and shift for feature ``i``). Any other tensor has one unit per dim-0 index (a 0-d tensor has one).
* ``parameter``: one node per scalar.

Example::

    >>> import torch.nn as nn
    >>> from hf_camhd import build_hierarchy
    >>> tree = build_hierarchy(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
    ...                        levels=("global", "layer", "unit"))
    >>> tree.num_nodes("layer"), tree.num_nodes("unit")
    (2, 5)
"""

from __future__ import annotations

import json
import math
import os
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

LEVELS: tuple[str, ...] = ("global", "block", "layer", "unit", "parameter")
"""Every level a tree may have, coarse to fine."""


def validate_levels(levels: Iterable[str] | str) -> tuple[str, ...]:
    """Check ``levels`` is an ordered subset of :data:`LEVELS` that starts with ``global``.

    A comma-separated string (``"global,layer"``) is accepted too. Returns the levels as a tuple.
    """
    if isinstance(levels, str):
        levels = [s.strip() for s in levels.split(",") if s.strip()]
    try:
        levels = tuple(levels)
    except TypeError:
        raise ValueError(f"Invalid levels: {levels!r}; expected a sequence of level names such as "
                         "('global', 'layer') or a string 'global,layer'") from None
    if not levels:
        raise ValueError("Invalid levels: empty; expected an ordered subset of "
                         f"{', '.join(LEVELS)} starting with 'global'")
    for lv in levels:
        if lv not in LEVELS:
            raise ValueError(f"Unknown level {lv!r}; expected one of {', '.join(LEVELS)}")
    if len(set(levels)) != len(levels):
        raise ValueError(f"Invalid levels {levels!r}: a level appears twice")
    if levels[0] != "global":
        raise ValueError(f"Invalid levels {levels!r}: the first level must be 'global' (the root of the tree)")
    order = [LEVELS.index(lv) for lv in levels]
    if order != sorted(order):
        raise ValueError(f"Invalid levels {levels!r}: levels must be ordered coarse to fine "
                         f"({', '.join(LEVELS)})")
    return levels


@dataclass(frozen=True)
class ParamEntry:
    """One trainable tensor of the tree: its name, shape and the nodes it belongs to.

    ``layer`` is the owning module's dotted path (or the tensor's own name when the root module
    owns it); ``block`` is the builder's block name (``None`` when the tree has no block level
    information); ``unit_dim`` is the dimension that indexes output units (0, or 1 for GPT-2's
    ``Conv1D`` weight stored as [in, out]).
    """

    name: str
    shape: tuple[int, ...]
    layer: str
    block: str | None = None
    unit_dim: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def to_list(self) -> list:
        return [self.name, list(self.shape), self.layer, self.block, self.unit_dim]

    @classmethod
    def from_list(cls, row: Sequence) -> ParamEntry:
        name, shape, layer, block, unit_dim = row
        return cls(str(name), tuple(int(s) for s in shape), str(layer),
                   None if block is None else str(block), int(unit_dim))


@dataclass(frozen=True)
class UnitGroup:
    """The units of one layer (or of one unpaired tensor): ``count`` nodes of ``size`` scalars each.

    ``owner`` is the entry index whose optimizer state stores the group's α vector; ``members``
    lists ``(entry index, unit dim)`` for every tensor whose slices belong to these units;
    ``offset`` is the index of the group's first unit in the tree's unit numbering.
    """

    owner: int
    count: int
    size: int
    offset: int
    members: tuple[tuple[int, int], ...]


class _NodeNames(Sequence):
    """A lazy list of node names (the parameter level can have billions of nodes)."""

    def __init__(self, length: int, name_of):
        self._len, self._name_of = length, name_of

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._name_of(j) for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        return self._name_of(i)

    def __eq__(self, other):
        return list(self) == list(other)

    def __repr__(self) -> str:
        head = ", ".join(repr(self[j]) for j in range(min(self._len, 4)))
        return f"[{head}{', ...' if self._len > 4 else ''}] ({self._len} names)"


class LRTree:
    """A learning-rate tree over a model's trainable tensors (docs/algorithm.md §1).

    Build one with :func:`hf_camhd.build_hierarchy` (from a model) or :meth:`from_entries`; pass it
    (or the model) to a CAM-HD optimizer. ``print(tree)`` shows one row per level.

    Args:
        entries: the trainable tensors, in optimizer order (tied tensors once, frozen ones left out).
        levels: an ordered subset of ``global, block, layer, unit, parameter`` starting with ``global``.
        module: optionally the ``nn.Module`` the tree was built from (kept as a weak reference, never
            saved), so an optimizer can be built from the tree alone.
    """

    def __init__(self, entries: Sequence[ParamEntry], levels: Iterable[str] = ("global", "layer"), *,
                 module: Any = None):
        self.levels: tuple[str, ...] = validate_levels(levels)
        entries = tuple(entries)
        if not entries:
            raise ValueError("Invalid params: the tree has no trainable parameters "
                             "(empty parameter list, or every parameter is frozen)")
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"Invalid tree: parameter {dup!r} appears twice")
        if "block" in self.levels:
            missing = [e.name for e in entries if e.block is None]
            if missing:
                raise ValueError(
                    f"Invalid levels: 'block' requested but parameter {missing[0]!r} has no block "
                    "(plain params carry no module structure; pass the model or model.named_parameters(), "
                    "or drop 'block' from levels)")
        self.entries: tuple[ParamEntry, ...] = entries
        self._module_ref = weakref.ref(module) if module is not None else None
        self._build_index()

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_entries(cls, entries: Sequence[ParamEntry], levels: Iterable[str] = ("global", "layer")) -> LRTree:
        return cls(entries, levels)

    def _build_index(self) -> None:
        entries = self.entries
        self.numels = [e.numel for e in entries]
        self.total_numel = sum(self.numels)
        # blocks and layers in order of first appearance
        self.block_names: list[str] = []
        self.layer_names: list[str] = []
        block_index: dict[str, int] = {}
        layer_index: dict[str, int] = {}
        layer_block: dict[str, str | None] = {}
        self.entry_block: list[int] = []
        self.entry_layer: list[int] = []
        for e in entries:
            if e.layer in layer_block and layer_block[e.layer] != e.block:
                raise ValueError(
                    f"Invalid tree: layer {e.layer!r} is split across blocks {layer_block[e.layer]!r} and "
                    f"{e.block!r} (parameter {e.name!r}); every layer must belong to exactly one block")
            layer_block[e.layer] = e.block
            if e.block is not None and e.block not in block_index:
                block_index[e.block] = len(self.block_names)
                self.block_names.append(e.block)
            if e.layer not in layer_index:
                layer_index[e.layer] = len(self.layer_names)
                self.layer_names.append(e.layer)
            self.entry_block.append(block_index[e.block] if e.block is not None else 0)
            self.entry_layer.append(layer_index[e.layer])
            if e.ndim and not 0 <= e.unit_dim < e.ndim:
                raise ValueError(f"Invalid unit_dim {e.unit_dim} for parameter {e.name!r} of shape {e.shape}")
        self.block_sizes = [0] * len(self.block_names)
        self.layer_sizes = [0] * len(self.layer_names)
        for i, n in enumerate(self.numels):
            if self.block_names:
                self.block_sizes[self.entry_block[i]] += n
            self.layer_sizes[self.entry_layer[i]] += n
        self._build_units()

    def _build_units(self) -> None:
        """Pair each layer's tensors into units (docs/algorithm.md §1) and number the units in parameter order."""
        entries = self.entries
        by_layer: dict[int, list[int]] = {}
        for i, li in enumerate(self.entry_layer):
            by_layer.setdefault(li, []).append(i)
        group_of_entry: dict[int, tuple[int, int]] = {}  # entry -> (owner entry, unit dim)
        groups_members: dict[int, list[tuple[int, int]]] = {}
        layer_anchor: set[int] = set()
        for members in by_layer.values():
            anchor = next((i for i in members if entries[i].name.rsplit(".", 1)[-1] == "weight"
                           and entries[i].ndim >= 1), None)
            if anchor is None:
                anchor = next((i for i in members if entries[i].ndim >= 1), members[0])
            layer_anchor.add(anchor)
            a = entries[anchor]
            n_anchor = a.shape[a.unit_dim] if a.ndim else 1
            for i in members:
                e = entries[i]
                if i == anchor:
                    group_of_entry[i] = (anchor, a.unit_dim if a.ndim else 0)
                elif a.ndim >= 1 and e.ndim == 1 and e.shape[0] == n_anchor:
                    group_of_entry[i] = (anchor, 0)  # a bias-like vector paired with the weight's units
                else:
                    group_of_entry[i] = (i, e.unit_dim if e.ndim else 0)  # its own units
                owner, dim = group_of_entry[i]
                groups_members.setdefault(owner, []).append((i, dim))
        self.unit_groups: list[UnitGroup] = []
        self.unit_labels: list[str] = []  # the layer name for a layer's units, else the tensor's name
        self.entry_unit_group: list[int] = [0] * len(entries)
        group_index: dict[int, int] = {}
        offset = 0
        for i in range(len(entries)):
            owner, _ = group_of_entry[i]
            if owner not in group_index:
                members = tuple(sorted(groups_members[owner]))
                o = entries[owner]
                count = o.shape[o.unit_dim] if o.ndim else 1
                size = sum(self.numels[m] // count for m, _ in members) if count else 0
                group_index[owner] = len(self.unit_groups)
                self.unit_groups.append(UnitGroup(owner, count, size, offset, members))
                self.unit_labels.append(o.layer if owner in layer_anchor else o.name)
                offset += count
            self.entry_unit_group[i] = group_index[owner]
        self.num_units = offset

    # ----------------------------------------------------------------------------- queries
    @property
    def module(self):
        """The module the tree was built from, if it is still alive (never saved)."""
        return self._module_ref() if self._module_ref is not None else None

    @property
    def param_names(self) -> list[str]:
        return [e.name for e in self.entries]

    def num_nodes(self, level: str) -> int:
        """Number of nodes at ``level`` (one of the tree's levels)."""
        self._check_level(level)
        return {"global": 1, "block": len(self.block_names), "layer": len(self.layer_names),
                "unit": self.num_units, "parameter": self.total_numel}[level]

    def node_names(self, level: str) -> Sequence[str]:
        """Node names at ``level``: blocks and layers by name; units as ``"layer[i]"``;
        parameters as ``"param.name[flat index]"`` (a lazy sequence)."""
        self._check_level(level)
        if level == "global":
            return ["global"]
        if level == "block":
            return list(self.block_names)
        if level == "layer":
            return list(self.layer_names)
        if level == "unit":
            import bisect
            starts = [g.offset for g in self.unit_groups]

            def unit_name(k: int) -> str:
                gi = bisect.bisect_right(starts, k) - 1
                return f"{self.unit_labels[gi]}[{k - starts[gi]}]"
            return _NodeNames(self.num_units, unit_name)
        offsets = [0]
        for n in self.numels:
            offsets.append(offsets[-1] + n)

        def param_name(k: int) -> str:
            import bisect
            i = bisect.bisect_right(offsets, k) - 1
            return f"{self.entries[i].name}[{k - offsets[i]}]"
        return _NodeNames(self.total_numel, param_name)

    def node_sizes(self, level: str) -> list[int]:
        """Number of trainable scalars under each node of ``level`` (not for ``parameter``: all 1)."""
        self._check_level(level)
        if level == "global":
            return [self.total_numel]
        if level == "block":
            return list(self.block_sizes)
        if level == "layer":
            return list(self.layer_sizes)
        if level == "unit":
            return [g.size for g in self.unit_groups for _ in range(g.count)]
        raise ValueError("node_sizes('parameter') is all ones; use num_nodes('parameter')")

    def _check_level(self, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"Unknown level {level!r}; expected one of {', '.join(LEVELS)}")
        if level not in self.levels:
            raise ValueError(f"Level {level!r} is not in this tree (levels: {', '.join(self.levels)})")

    def with_levels(self, levels: Iterable[str]) -> LRTree:
        """The same parameters and nodes with a different set of levels."""
        return LRTree(self.entries, levels, module=self.module)

    def reordered(self, names: Sequence[str]) -> LRTree:
        """The tree with its entries in the order of ``names`` (each name exactly once)."""
        by_name = {e.name: e for e in self.entries}
        if sorted(names) != sorted(by_name):
            extra = [n for n in names if n not in by_name]
            missing = [n for n in by_name if n not in set(names)]
            raise ValueError(f"Invalid params: parameters {extra[:3]} are not in the tree and "
                             f"{missing[:3]} of the tree are missing from the optimizer")
        return LRTree([by_name[n] for n in names], self.levels, module=self.module)

    # ----------------------------------------------------------------------------- plain data
    def to_dict(self) -> dict:
        """Plain data (lists, strings, ints): JSON- and ``torch.load(weights_only=True)``-safe."""
        return {"levels": list(self.levels), "params": [e.to_list() for e in self.entries]}

    @classmethod
    def from_dict(cls, data: dict) -> LRTree:
        return cls([ParamEntry.from_list(r) for r in data["params"]], data["levels"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the tree as JSON (atomically: a temporary file renamed onto ``path``)."""
        from ..files import atomic_write_json

        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> LRTree:
        """Read a tree written by :meth:`save`."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def first_difference(self, other: LRTree | dict) -> str | None:
        """``None`` when ``other`` has the same levels and nodes, else a sentence naming the first
        mismatching parameter."""
        data = other.to_dict() if isinstance(other, LRTree) else other
        mine = self.to_dict()
        if list(data["levels"]) != mine["levels"]:
            return f"levels differ: {list(data['levels'])} vs {mine['levels']}"
        for a, b in zip(data["params"], mine["params"]):
            a = ParamEntry.from_list(a)
            b = ParamEntry.from_list(b)
            if a != b:
                what = [f for f in ("name", "shape", "layer", "block", "unit_dim")
                        if getattr(a, f) != getattr(b, f)]
                return (f"parameter {b.name!r} differs in {', '.join(what)}: "
                        f"saved {a.to_list()} vs current {b.to_list()}")
        if len(data["params"]) != len(mine["params"]):
            n = min(len(data["params"]), len(mine["params"]))
            longer = data["params"] if len(data["params"]) > n else mine["params"]
            side = "saved" if longer is data["params"] else "current"
            return f"parameter {longer[n][0]!r} exists only in the {side} tree"
        return None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LRTree) and self.to_dict() == other.to_dict()

    def __hash__(self):
        return hash(json.dumps(self.to_dict()))

    # ----------------------------------------------------------------------------- display
    def summary_rows(self) -> list[tuple[str, int, int, int, int]]:
        """``(level, nodes, parameters, smallest node, largest node)`` per level."""
        rows = []
        for lv in self.levels:
            sizes = [1] if lv == "parameter" else self.node_sizes(lv)
            rows.append((lv, self.num_nodes(lv), self.total_numel, min(sizes), max(sizes)))
        return rows

    def __str__(self) -> str:
        header = ("level", "nodes", "parameters", "smallest node", "largest node")
        rows = [tuple(f"{v:,}" if isinstance(v, int) else v for v in r) for r in self.summary_rows()]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([f"LRTree over {len(self.entries)} tensors", line(header), sep, *map(line, rows)])

    def __repr__(self) -> str:
        return (f"LRTree(levels={self.levels}, tensors={len(self.entries)}, "
                f"nodes={[self.num_nodes(lv) for lv in self.levels]})")
