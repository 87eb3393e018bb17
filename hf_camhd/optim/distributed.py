"""Cross-rank support for CAM-HD: sharded parameters (FSDP2 ``DTensor`` s) and flattened (ZeRO) groups.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every rank holds a shard of each parameter and of
its gradient. CAM-HD's node sums (spec §3) must be over the whole node, so each rank computes the
*local partial sums* of everything that is summed — the per-tensor ``Σ g·u`` (global / block / layer
levels), the per-unit sums (unit level) and the partial ``Σ α·h`` of the unit and parameter levels
(``∂f/∂γ``) — writes them into ONE small vector (``T + units + 2`` numbers) and sums it with ONE
``all_reduce`` over the parameters' shard group. Every rank then runs the same update on the same
numbers, so γ and the coarse α (replicated in ``param_groups[0]``) stay bitwise identical across ranks.

State placement (why): the parameter level's offsets, ``hypergrad_dir`` and the base moments are
``zeros_like(param)``, i.e. DTensors with the parameter's placements — sharded exactly like the
parameter, so no rank stores more than its shard. The unit level's α vector of a layer is a DTensor on
the parameter's mesh, ``Shard(0)`` when every tensor of the layer is sharded along its unit dimension
(FSDP2's default ``Shard(0)`` with units on dim 0: a rank's α shard covers exactly the units of its
rows, so the update needs no communication), ``Replicate()`` otherwise (e.g. GPT-2's ``Conv1D``,
whose units are along dim 1 while FSDP2 shards dim 0: every rank needs every unit's α). Both are
DTensors, so ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` and DCP save and reshard them
like any other optimizer state.

DeepSpeed ZeRO flattens each param group into one partition per rank: the tree's tensors no longer
exist, so :func:`check_not_flattened` raises a clear error at the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["ShardPlan", "TensorLayout", "check_not_flattened", "is_dtensor", "tensor_layout"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel shard)."""
    return DTensor is not None and isinstance(t, DTensor)


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
    if not is_dtensor(p):
        n = p.shape[unit_dim] if p.ndim else 1
        return TensorLayout(None, None, 0, n)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, p.placements
    shard_dims = [d for d, pl in enumerate(placements) if pl.is_shard()]
    if any(pl.is_partial() for pl in placements):
        raise NotImplementedError(f"CAM-HD: parameter {name!r} has a Partial placement {placements}; "
                                  "only Shard and Replicate parameters are supported")
    n = p.shape[unit_dim] if p.ndim else 1
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


@dataclass
class ShardPlan:
    """What the kernels need to know about sharding for one step (see the module docstring).

    ``keys[i]``: reduction key of tensor ``i`` of the step (``None``: whole on every rank);
    ``unit_ranges[i]``: its local range along its unit dimension; ``alpha_lo[gi]``: the first unit of unit
    group ``gi`` held by this rank's α shard (0 when the α vector is replicated).
    """

    keys: list[str | None]
    unit_ranges: list[tuple[int, int]]
    groups: dict[str, Any]
    alpha_lo: dict[int, int] = field(default_factory=dict)
    _masks: dict = field(default_factory=dict)

    def mask(self, key: str | None, device: torch.device) -> Tensor:
        """Boolean mask over the step's tensors: which ones reduce over ``key``."""
        hit = self._masks.get((key, device))
        if hit is None:
            hit = torch.tensor([k == key for k in self.keys], dtype=torch.bool, device=device)
            self._masks[(key, device)] = hit
        return hit

    @property
    def distinct_keys(self) -> list[str | None]:
        out: list[str | None] = []
        for k in self.keys:
            if k not in out:
                out.append(k)
        return out

    def reduce(self, parts: dict[str | None, Tensor]) -> Tensor:
        """``parts[None] + Σ_k all_reduce(parts[k])``: one ``all_reduce`` per process group (one with FSDP2)."""
        import torch.distributed as dist

        total = parts.get(None)
        for key, vec in parts.items():
            if key is None:
                continue
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=self.groups[key])
            total = vec if total is None else total + vec
        return total


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


def full_unit_alpha(owner: Tensor, member_layouts, count: int, value: float, dtype: torch.dtype) -> Tensor:
    """A unit group's α vector (``count`` units, all ``value``) as a DTensor placed by :func:`unit_alpha_placements`."""
    import torch.distributed.tensor as dt

    mesh, placements = unit_alpha_placements(owner, member_layouts)
    return dt.full((count,), value, dtype=dtype, device_mesh=mesh, placements=placements)


def local_range(t: Tensor) -> tuple[int, int]:
    """The range of dim 0 of a 1-D (D)Tensor held by this rank."""
    if not is_dtensor(t):
        return 0, t.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0], offset[0] + shape[0]


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
