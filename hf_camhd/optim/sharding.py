"""How the optimizer's tensors are split across ranks: one strategy object, chosen once per optimizer.

CAM-HD's node sums (``docs/algorithm.md`` §3) must be over the whole node. Two strategies share one
interface, and the step never asks which one it has:

* :class:`LocalTensors` — every tensor is whole in this process (one process, or DDP, whose gradients
  are already all-reduced): local views are the tensors themselves and the sums need no communication.
* :class:`ShardedTensors` — FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and
  state are ``DTensor`` s. The step works on each rank's local shards; every partial sum of the step
  (per-tensor ``Σ g·u``, per-unit sums, the ``∂f/∂γ`` partials) goes into ONE small vector summed with
  ONE ``all_reduce`` over the shard group, so every rank runs the same update on the same numbers and γ
  and the coarse α (replicated in ``param_groups[0]``) stay bitwise identical across ranks.

State placement under FSDP2: the parameter level's offsets, ``hypergrad_dir`` and the base moments are
``zeros_like(param)``, i.e. sharded exactly like the parameter. The unit level's α vector of a layer is
a DTensor on the parameter's mesh, ``Shard(0)`` when every tensor of the layer is sharded along its unit
dimension (FSDP2's default with units on dim 0: a rank's α shard covers exactly the units of its rows,
so the update needs no communication), ``Replicate()`` otherwise (GPT-2's ``Conv1D``: units along dim
1 while FSDP2 shards dim 0). Both are DTensors, so ``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` and DCP save and reshard them like any other optimizer state.

DeepSpeed ZeRO flattens each param group into one partition per rank: the tree's tensors no longer
exist, so :func:`check_not_flattened` raises a clear error at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._state import NodeSums, PartialSums, StepTensors

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["LocalTensors", "ShardedTensors", "TensorLayout", "check_not_flattened", "choose_sharding", "is_dtensor",
           "tensor_layout"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel shard)."""
    return DTensor is not None and isinstance(t, DTensor)


def choose_sharding(params: list[Tensor], tree) -> LocalTensors:
    """The strategy for these parameters: :class:`ShardedTensors` when any is a DTensor."""
    return ShardedTensors(tree) if any(is_dtensor(p) for p in params) else LocalTensors()


class LocalTensors:
    """Every tensor is whole in this process: local views are the tensors, sums need no communication."""

    sharded = False

    def local(self, t: Tensor) -> Tensor:
        return t

    def views(self, state: dict, param: Tensor) -> dict:
        return state

    def unit_range(self, i: int, p: Tensor, unit_dim: int) -> tuple[int, int]:
        return 0, (p.shape[unit_dim] if p.ndim else 1)

    def new_unit_vector(self, owner: Tensor, members: list[tuple[int, Tensor, int]], shape: tuple[int, ...],
                        value: float, dtype: torch.dtype) -> Tensor:
        """A per-unit state tensor (units along dim 0) filled with ``value``."""
        return torch.full(shape, value, dtype=dtype, device=owner.device)

    def alpha_start(self, alpha: Tensor) -> int:
        return 0

    def reduce(self, part: PartialSums, step: StepTensors, unit_count: list[int]) -> NodeSums:
        """Add the members' unit rows into one vector per unit group and total the γ partials."""
        units: dict[int, Tensor] = {}
        for gi, r in zip(step.unit_groups or (), part.unit_rows or ()):
            units[gi] = units[gi] + r if gi in units else r
        return NodeSums(part.tensor, units, _total(part.gamma_unit), _total(part.gamma_param))

    def any_nonzero(self, grads: list[tuple[int, Tensor]]) -> bool:
        return any(bool(g.any()) for _, g in grads)


def _total(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.sum()


@dataclass(frozen=True)
class TensorLayout:
    """How one tensor is split across ranks.

    ``group`` is the process group its partial sums are reduced over (``None``: the local tensor is the
    whole tensor, its sums are complete); ``unit_lo:unit_hi`` is the range of the tensor's unit
    dimension held locally (the whole dimension when it is not sharded along it).
    """

    group: Any
    key: str | None
    unit_lo: int
    unit_hi: int
    shard_mesh_dim: int | None = None
    shard_dim: int | None = None


def tensor_layout(p: Tensor, unit_dim: int, name: str = "") -> TensorLayout:
    """The :class:`TensorLayout` of parameter ``p`` (a plain tensor or a DTensor)."""
    n = p.shape[unit_dim] if p.ndim else 1
    if not is_dtensor(p):
        return TensorLayout(None, None, 0, n)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, p.placements
    if any(pl.is_partial() for pl in placements):
        raise NotImplementedError(f"CAM-HD: parameter {name!r} has a Partial placement {placements}; "
                                  "only Shard and Replicate parameters are supported")
    shard_dims = [d for d, pl in enumerate(placements) if pl.is_shard()]
    if not shard_dims:
        return TensorLayout(None, None, 0, n)
    if len(shard_dims) > 1:
        raise NotImplementedError(f"CAM-HD: parameter {name!r} is sharded over {len(shard_dims)} mesh dimensions "
                                  f"({placements}); CAM-HD supports one sharded mesh dimension (FSDP2, HSDP)")
    md = shard_dims[0]
    group = mesh.get_group(md)
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    lo, hi = 0, n
    if p.ndim:
        lo, hi = offset[unit_dim], offset[unit_dim] + local_shape[unit_dim]
        if local_shape[unit_dim] == 0:
            lo = hi = min(offset[unit_dim], n)
    key = getattr(group, "group_name", None) or str(id(group))
    return TensorLayout(group, key, lo, hi, md, placements[md].dim)


def local_range(t: Tensor) -> tuple[int, int]:
    """The range of dim 0 of a 1-D (D)Tensor held by this rank."""
    if not is_dtensor(t):
        return 0, t.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0], offset[0] + shape[0]


class ShardedTensors:
    """FSDP2: local shards, one ``all_reduce`` of the step's partial sums, state placed like the parameter."""

    sharded = True

    def __init__(self, tree):
        self.tree = tree
        self._layouts: dict[int, tuple] = {}

    def local(self, t: Tensor) -> Tensor:
        return t.to_local() if is_dtensor(t) else t

    def layout(self, i: int, p: Tensor) -> TensorLayout:
        """How tensor ``i`` is split (cached; recomputed when its mesh, placements or shape change)."""
        key = (p.device_mesh, tuple(p.placements), tuple(p.shape)) if is_dtensor(p) else (None, None, tuple(p.shape))
        hit = self._layouts.get(i)
        if hit is None or hit[0] != key:
            e = self.tree.entries[i]
            hit = self._layouts[i] = (key, tensor_layout(p, e.unit_dim if p.ndim else 0, e.name))
        return hit[1]

    def views(self, state: dict, param: Tensor) -> dict:
        """The state with local shards in place of DTensors; entries the step adds (a momentum buffer created
        from the local gradient) are written through to the real state as DTensors placed like the parameter."""
        return _LocalStateView(state, param, self)

    def unit_range(self, i: int, p: Tensor, unit_dim: int) -> tuple[int, int]:
        lay = self.layout(i, p)
        return lay.unit_lo, lay.unit_hi

    def new_unit_vector(self, owner: Tensor, members: list[tuple[int, Tensor, int]], shape: tuple[int, ...],
                        value: float, dtype: torch.dtype) -> Tensor:
        """A per-unit state tensor (units along dim 0) as a DTensor placed by :func:`unit_alpha_placements`."""
        if not is_dtensor(owner):
            return torch.full(shape, value, dtype=dtype, device=owner.device)
        from torch.distributed.tensor import full as dtensor_full

        layouts = [(self.layout(i, p), dim) for i, p, dim in members]
        mesh, placements = unit_alpha_placements(owner, layouts)
        return dtensor_full(shape, value, dtype=dtype, device_mesh=mesh, placements=placements)

    def alpha_start(self, alpha: Tensor) -> int:
        return local_range(alpha)[0]

    def reduce(self, part: PartialSums, step: StepTensors, unit_count: list[int]) -> NodeSums:
        """Every partial sum of the step in one small vector per process group, summed across ranks at once.

        Layout: ``[per-tensor sums (T × C) | unit sums of every touched unit group (full length × C, zeros outside
        this rank's units) | Σ α_unit·h | Σ offset·h]`` (C channels: Σ g·u, and for the normalized rule Σ g² and
        Σ u² — the norms are node sums too). Tensors that are whole on every rank contribute after the reduction
        (to a separate local vector), so nothing is counted once per rank.
        """
        S = part.tensor
        home, hd = S.device, S.dtype
        T, C = S.shape
        keys = [self.layout(i, p).key for i, p in zip(step.index, step.stored)]
        groups = {self.layout(i, p).key: self.layout(i, p).group for i, p in zip(step.index, step.stored)}
        offsets: dict[int, int] = {}
        n = T * C
        for gi in step.unit_groups or ():
            if gi not in offsets:
                offsets[gi] = n
                n += unit_count[gi] * C
        vecs: dict = {}
        for key in dict.fromkeys(keys):
            mask = torch.tensor([k == key for k in keys], dtype=torch.bool, device=home).unsqueeze(1)
            v = torch.zeros(n + 2, dtype=hd, device=home)
            v[:T * C] = torch.where(mask, S, torch.zeros_like(S)).reshape(-1)
            vecs[key] = v
        for i, r in enumerate(part.unit_rows or ()):
            lo, hi = step.unit_ranges[i]
            o = offsets[step.unit_groups[i]]
            vecs[keys[i]][o + lo * C:o + hi * C] += r.reshape(-1)
        for col, x in ((n, part.gamma_unit), (n + 1, part.gamma_param)):
            if x is not None:
                for i in range(T):
                    vecs[keys[i]][col] += x[i]
        import torch.distributed as dist

        total = vecs.get(None)
        for key, vec in vecs.items():
            if key is not None:
                dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=groups[key])
                total = vec if total is None else total + vec
        units = {gi: total[o:o + unit_count[gi] * C].reshape(-1, C) for gi, o in offsets.items()}
        return NodeSums(total[:T * C].reshape(T, C), units, total[n] if part.gamma_unit is not None else None,
                        total[n + 1] if part.gamma_param is not None else None)

    def any_nonzero(self, grads: list[tuple[int, Tensor]]) -> bool:
        """Whether any gradient has a non-zero entry on any rank (every rank decides alike)."""
        import torch.distributed as dist

        flag = torch.tensor([float(any(bool(self.local(g).any()) for _, g in grads))])
        groups = {}
        for i, g in grads:
            if is_dtensor(g):
                lay = self.layout(i, g)
                if lay.key is not None:
                    groups.setdefault(lay.key, lay.group)
        if groups:
            flag = flag.to(self.local(grads[0][1]).device)
            for group in groups.values():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


class _LocalStateView(dict):
    """A parameter's optimizer state seen as local shards (see :meth:`ShardedTensors.views`)."""

    def __init__(self, state: dict, param: Tensor, sharding: ShardedTensors):
        super().__init__({k: sharding.local(v) for k, v in state.items()})
        self._state, self._param = state, param
        self._local_shape = sharding.local(param).shape

    def __setitem__(self, key, v) -> None:
        super().__setitem__(key, v)
        shaped = isinstance(v, Tensor) and v.shape == self._local_shape and is_dtensor(self._param)
        self._state[key] = wrap_like(self._param, v) if shaped else v


def unit_alpha_placements(owner: Tensor, member_layouts: list[tuple[TensorLayout, int]]):
    """Placements of a unit group's α vector on the owner's mesh: ``Shard(0)`` on the owner's shard mesh
    dimension when every member is sharded along its unit dimension there (then every rank's α shard
    covers exactly its local units), ``Replicate()`` elsewhere."""
    mesh = owner.device_mesh
    owner_layout = member_layouts[0][0]
    sharded = owner_layout.shard_mesh_dim is not None and all(
        lay.shard_mesh_dim == owner_layout.shard_mesh_dim and lay.shard_dim == unit_dim
        for lay, unit_dim in member_layouts)
    return mesh, [Shard(0) if sharded and d == owner_layout.shard_mesh_dim else Replicate() for d in range(mesh.ndim)]


def wrap_like(p: Tensor, local: Tensor) -> Tensor:
    """``local`` (this rank's shard of a tensor shaped like DTensor ``p``) as a DTensor placed like ``p``."""
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def check_not_flattened(opt, flat: list[Tensor]) -> None:
    """Raise a clear error when the optimizer's tensors no longer match its tree (ZeRO-style flattening).

    Cheap: a length check, then one shape comparison per tensor.
    """
    entries = opt.tree.entries
    if len(flat) == len(entries) and all(p.shape == e.shape for p, e in zip(flat, entries)):
        return
    shapes = [tuple(p.shape) for p in flat[:4]]
    others = [lv for lv in opt.tree.levels if lv != "global"]
    what = (f"the levels {', '.join(others)} of this tree cannot exist on flattened partitions (they need the "
            "model's own tensors), and the global level would be summed over one partition only"
            if others else "the global level would be summed over one rank's partition only (no cross-rank sum)")
    raise RuntimeError(
        f"{type(opt).__name__}.step: the optimizer holds {len(flat)} tensor(s) of shape(s) {shapes}"
        f"{' ...' if len(flat) > 4 else ''} but its learning-rate tree has {len(entries)} tensors "
        f"({entries[0].name!r}, ...): the parameter groups were replaced, e.g. flattened into one partition per "
        f"rank by DeepSpeed ZeRO. CAM-HD does not support flattened groups: {what}. Train with DDP or FSDP2 "
        "(torch.distributed.fsdp.fully_shard, or accelerate's FSDP plugin with fsdp_version=2) instead of ZeRO.")
