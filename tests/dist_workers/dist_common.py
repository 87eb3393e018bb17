"""Model, data and snapshots shared by the multi-process workers and the tests that compare against them.

The model has every kind of tensor FSDP2 can make awkward: a weight whose first dimension (5) does
not split evenly over 2 ranks, a norm, a 1-row tensor (rank 1 holds an empty shard), and one weight whose
units are along dim 1 (like GPT-2's Conv1D; its unit-level α is replicated instead of sharded).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD, build_hierarchy
from hf_camhd.hierarchy import LRTree

LEVELS = ("global", "block", "layer", "unit", "parameter")
GLOBAL_BATCH = 16
STEPS = 20
# note: float64, because the rounding noise of fp32 reductions (DDP's averaging order) is amplified by the large β, δ
# used here to make α and γ move a lot in 20 steps; a missing or double-counted reduction gives errors of ~1e-2
DTYPE = torch.float64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 5)          # 5 rows over 2 ranks: 3 + 2
        self.norm = nn.LayerNorm(5)
        self.mid = nn.Linear(5, 3)          # units along dim 1 in the tree (Conv1D-like)
        self.head = nn.Linear(3, 4)
        self.temp = nn.Parameter(torch.ones(1))  # 1 row: an empty shard on rank 1

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)))
        return self.head(torch.tanh(self.mid(h))) * self.temp


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(DTYPE)


def make_tree(model: nn.Module) -> LRTree:
    tree = build_hierarchy(model, LEVELS)
    entries = [dataclasses.replace(e, unit_dim=1) if e.name == "mid.weight" else e for e in tree.entries]
    return LRTree(entries, LEVELS, module=model)


# also run under FSDP2: their state entries are created on local shards (AdamW's d, SGD's momentum buffer)
OTHER_BASES = ("adamw", "sgdn", "normalized")  # "normalized": Adam with the normalized rule (its norms are node sums)


def make_optimizer(model: nn.Module, base: str = "adam"):
    tree = make_tree(model)
    rule = "normalized" if base == "normalized" else "additive"
    kw = dict(levels=None, tree=tree, hypergrad_rule=rule, hypergrad_smoothing=0.5)
    if rule == "normalized":
        kw.update(hypergrad_lr=0.05, gamma_lr=0.5)
    if base == "adamw":
        kw = dict(dict(hypergrad_lr=3e-3, gamma_lr=20.0), **kw)
        return CAMHDAdamW(model, lr=1e-2, weight_decay=0.1, gamma_update="softmax", **kw)
    if base == "sgdn":
        kw = dict(dict(hypergrad_lr=1e-2, gamma_lr=20.0), **kw)
        return CAMHDSGD(model, lr=0.05, momentum=0.9, nesterov=True, **kw)
    kw = dict(dict(hypergrad_lr=3e-3, gamma_lr=20.0), **kw)
    return CAMHDAdam(model, lr=1e-2, decay_rate=0.01, weight_decay=1e-3, **kw)


def batch(step: int):
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=DTYPE)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    return x, y


def train_steps(model, opt, start: int, stop: int, rank: int = 0, world: int = 1):
    per = GLOBAL_BATCH // world
    for t in range(start, stop):
        x, y = batch(t)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach().clone().cpu()


def snapshot(model: nn.Module, opt) -> dict:
    """γ, every level's α and the parameters as full CPU tensors (collective under FSDP2: call on every rank)."""
    inner = getattr(model, "module", model)
    out = {"gamma": opt.gamma.cpu(), "steps": torch.tensor(opt.num_steps)}
    for lv in opt.levels:
        out["alpha_" + lv] = opt.alpha(lv).cpu()
    stats = opt.lr_stats()  # the logging scalars (sharded levels are reduced across ranks)
    out["lr_stats"] = torch.tensor([stats[k] for k in sorted(stats)], dtype=torch.float64)
    for name, p in inner.named_parameters():
        out["param_" + name] = _full(p)
    return out
