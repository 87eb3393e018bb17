"""At their defaults (the normalized rule, its β, δ and ρ), the CAM-HD optimizers converge wherever their base
optimizer converges at its working learning rate — for every tree, in float32, float64 and bf16, with weight
decay and a StepLR schedule (the kind of small problems torch's own optimizer tests use)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDScheduleFreeAdamW, CAMHDSGD

from conftest import level_subsets

pytestmark = [pytest.mark.usefixtures("one_thread"),  # one linear layer: one block, as the builder warns
              pytest.mark.filterwarnings("ignore:build_hierarchy. every parameter:UserWarning")]

# (CAM-HD class, torch counterpart, base keywords at the base's working lr)
OPTIMIZERS = {
    "sgd": (CAMHDSGD, torch.optim.SGD, dict(lr=0.1, weight_decay=1e-4)),
    "sgd-nesterov": (CAMHDSGD, torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    "adam": (CAMHDAdam, torch.optim.Adam, dict(lr=3e-2, weight_decay=1e-4)),
    "adamw": (CAMHDAdamW, torch.optim.AdamW, dict(lr=3e-2, weight_decay=1e-2)),
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class _Regression(nn.Module):
    """A linear layer regressed on a fixed target (torch's test_optim problem), named so trees have blocks."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(10, 5).to(dtype)

    def forward(self, x):
        return self.body(x)


def _linear_regression(opt_of, dtype, steps=300):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g).to(dtype)
    target = (x.float() @ torch.randn(10, 5, generator=g) + 0.5).to(dtype)
    model = _Regression(dtype)
    opt = opt_of(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), target.float())
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, opt


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_defaults_converge_where_the_base_converges_for_every_tree(name, dtype):
    cls, ref_cls, kw = OPTIMIZERS[name]
    base, _ = _linear_regression(lambda m: ref_cls(m.parameters(), **kw), DTYPES[dtype])
    assert base[-1] < 0.05 * base[0]  # the problem: the base optimizer converges at this lr
    for levels in level_subsets():
        losses, opt = _linear_regression(lambda m: cls(m, levels=levels, **kw), DTYPES[dtype])
        assert opt.config.normalized and opt.config.gamma_lr > 0  # the defaults: the normalized rule, γ learned
        assert all(math.isfinite(v) for v in losses), (levels, losses[-5:])
        # converges like the base: within 1.5x of its final loss, plus the dtype's noise floor
        floor = {"bfloat16": 2e-2, "float32": 1e-6, "float64": 1e-9}[dtype] * base[0]
        assert losses[-1] <= 1.5 * base[-1] + floor, (levels, losses[-1], base[-1])


@pytest.mark.parametrize("name", list(OPTIMIZERS) + ["schedule-free"])
def test_defaults_fit_least_squares(name):
    """A least-squares fit of an over-determined system: the defaults reach the base's residual."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(200, 20, generator=g, dtype=torch.float64)
    b = A @ torch.randn(20, generator=g, dtype=torch.float64) + 0.1 * torch.randn(200, generator=g, dtype=torch.float64)
    best = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    floor = float(((A @ best - b) ** 2).mean())

    def fit(make):
        w = nn.Parameter(torch.zeros(20, dtype=torch.float64))
        opt = make([("w", w)])
        if hasattr(opt, "train"):
            opt.train()
        for _ in range(1500):
            opt.zero_grad()
            loss = ((A @ w - b) ** 2).mean()
            loss.backward()
            opt.step()
        if hasattr(opt, "eval"):
            opt.eval()
        return float(((A @ w.detach() - b) ** 2).mean())

    if name == "schedule-free":
        import schedulefree
        base = fit(lambda p: schedulefree.AdamWScheduleFree([t for _, t in p], lr=3e-2))
        ours = fit(lambda p: CAMHDScheduleFreeAdamW(p, lr=3e-2))
    else:
        cls, ref_cls, kw = OPTIMIZERS[name]
        kw = dict(kw, weight_decay=0.0)
        base = fit(lambda p: ref_cls([t for _, t in p], **kw))
        ours = fit(lambda p: cls(p, **kw))
    assert base <= 1.05 * floor
    assert ours <= 1.05 * floor, (ours, base, floor)
