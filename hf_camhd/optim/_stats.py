"""Logging scalars of a CAM-HD optimizer: γ, α per level, the effective rate of the last step, skips.

Statistics cover the tensors that are trainable now (``requires_grad``): frozen tensors stay in the tree
at α₀ and would otherwise pull every mean and minimum towards it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._functional import decay_factor, value
from ._state import ALPHA_OFFSET, GAMMA, LAST_LR_SCALE, LR0, SKIPPED

_INF = float("inf")


def lr_stats(opt) -> dict[str, float]:
    """See :meth:`hf_camhd.optim.camhd.CAMHDOptimizer.lr_stats`."""
    cfg, tree = opt.config, opt.tree
    g0 = opt.param_groups[0]
    gamma = g0[GAMMA]
    trainable = [p.requires_grad for p in opt._flat_params()]
    n_total = sum(n for n, ok in zip(tree.numels, trainable) if ok) or 1
    out: dict[str, Tensor] = {}
    mean_star = 0.0
    for j, lv in enumerate(cfg.levels):
        out[f"camhd/gamma_{lv}"] = gamma[j]
        if lv == "parameter":  # streamed per tensor: no model-sized concatenation
            total, lo, hi = _parameter_level_stats(opt, trainable)
            mean, weighted = total / n_total, total / n_total
        else:
            a = opt.alpha(lv, dtype=None).to(gamma.device, gamma.dtype)
            sizes = torch.tensor(_node_sizes(tree, lv, trainable), dtype=a.dtype, device=a.device)
            live = a[sizes > 0] if bool((sizes > 0).any()) else a
            mean, lo, hi = live.mean(), live.min(), live.max()
            weighted = (a * sizes).sum() / n_total  # mean of α* over scalars = Σ_j γ_j · size-weighted mean of α_j
        out[f"camhd/alpha_{lv}_mean"] = mean
        out[f"camhd/alpha_{lv}_min"] = lo
        out[f"camhd/alpha_{lv}_max"] = hi
        mean_star = mean_star + gamma[j] * torch.as_tensor(weighted).to(gamma.device, gamma.dtype)
    # the rate the last step used: its number t, its scheduler multiplier (the next step's before any step)
    tau = decay_factor(cfg, max(opt.num_steps, 1))
    s = value(g0[LAST_LR_SCALE]) if LAST_LR_SCALE in g0 else value(g0["lr"]) / g0[LR0]
    out["camhd/alpha_star_mean"] = mean_star
    out["camhd/effective_lr_mean"] = s * (tau * mean_star + (1 - tau) * cfg.alpha_inf)
    out["camhd/skipped_steps"] = g0[SKIPPED]
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for v in out.values()])
    return dict(zip(out.keys(), values.tolist()))


def _node_sizes(tree, level: str, trainable: list[bool]) -> list[int]:
    """Trainable scalars under each node of a coarse or unit ``level``."""
    numels = [n if ok else 0 for n, ok in zip(tree.numels, trainable)]
    if level == "global":
        return [sum(numels)]
    if level in ("block", "layer"):
        of = tree.entry_block if level == "block" else tree.entry_layer
        sizes = [0] * tree.num_nodes(level)
        for e, node in enumerate(of):
            sizes[node] += numels[e]
        return sizes
    return [sum(numels[m] // g.count for m, _ in g.members) for g in tree.unit_groups for _ in range(g.count)]


def _parameter_level_stats(opt, trainable: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Sum, min and max of the parameter level's α over the trainable scalars, one tensor at a time (α₀ +
    offset in the offset's dtype, as the step does); sharded tensors are reduced across ranks."""
    lr = opt.config.lr
    device = opt.param_groups[0][GAMMA].device
    sharding = opt._get_sharding(opt._flat_params())
    acc: dict = {}     # reduction key -> [Σα, min α, max α]; keys in parameter order (the same on every rank)
    groups: dict = {}
    for i, p in enumerate(opt._flat_params()):
        if not trainable[i]:
            continue
        key = None
        if sharding.sharded:
            lay = sharding.layout(i, p)
            key = lay.key
            if key is not None:
                groups[key] = lay.group
        a = opt.state.get(p, {}).get(ALPHA_OFFSET)
        if a is None:
            n = sharding.local(p).numel()
            part = [lr * n, lr, lr] if n else [0.0, _INF, -_INF]
        else:
            v = sharding.local(a).detach()
            part = [0.0, _INF, -_INF]
            if v.numel():
                v = (v + lr).to(torch.float64)
                part = [v.sum(), v.min(), v.max()]
        part = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device).reshape(()) for x in part])
        prev = acc.get(key)
        acc[key] = part if prev is None else _merge(prev, part)
    total = None
    for key, v in acc.items():
        if key is not None:  # one SUM and one MAX (of max and −min) per process group
            import torch.distributed as dist
            sums, ext = v[:1].clone(), torch.stack([v[2], -v[1]])
            dist.all_reduce(sums, group=groups[key])
            dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=groups[key])
            v = torch.stack([sums[0], -ext[1], ext[0]])
        total = v if total is None else _merge(total, v)
    if total is None:
        return torch.tensor(0.0), torch.tensor(lr), torch.tensor(lr)
    return total[0], total[1], total[2]


def _merge(a: Tensor, b: Tensor) -> Tensor:
    return torch.stack([a[0] + b[0], torch.minimum(a[1], b[1]), torch.maximum(a[2], b[2])])
