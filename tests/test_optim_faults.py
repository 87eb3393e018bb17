"""Fault injection in the step: thousands of steps of NaN / inf entries, all-zero, missing and 1e±30-scaled
gradients, huge β and δ, γ starting at a vertex — over every base rule, tree and implementation.

Invariants checked after every step: no exception; every α finite and within [alpha_min, alpha_max]; γ
finite, ≥ 0 and summing to 1; the parameters of every tensor whose gradients were always finite are
finite; and the skipped hyper-steps counted in the state (and reported by ``lr_stats()``) are exactly the
steps whose hyper-gradient was not finite.
"""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*hyper-gradient steps are too large:RuntimeWarning")]

BASES = {
    "sgd": (CAMHDSGD, dict(lr=0.05)),
    "sgd-nesterov": (CAMHDSGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)),
    "adam": (CAMHDAdam, dict(lr=1e-3, weight_decay=1e-4, amsgrad=True)),
    "adamw": (CAMHDAdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "adam-softmax": (CAMHDAdam, dict(lr=1e-3, gamma_update="softmax")),
}
TREES = [("global",), ("global", "block"), ("global", "layer", "unit"), ("global", "layer", "parameter"),
         ("global", "block", "layer", "unit", "parameter")]
IMPLS = {"reference": dict(foreach=False), "multi_tensor": dict(foreach=True), "fused_cpu": dict(fused=True)}
STEPS = 140  # 5 bases × 5 trees × 3 implementations × 140 = 10,500 steps


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3))
        self.c = nn.Linear(7, 2)


def _fault(rng: random.Random, g: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """A gradient with a random fault (or none); whether it holds a non-finite entry."""
    r = rng.random()
    if r < 0.03:
        g = g.clone()
        g.view(-1)[rng.randrange(g.numel())] = rng.choice([math.nan, math.inf, -math.inf])
        return g, True
    if r < 0.10:
        return torch.zeros_like(g), False
    if r < 0.15:
        return g * 1e30, False
    if r < 0.20:
        return g * 1e-30, False
    if r < 0.25:
        return None, False
    return g, False


def _check(opt, model, poisoned: set[int], lo: float, hi: float) -> None:
    for lv in opt.levels:
        a = opt.alpha(lv, dtype=None)
        assert torch.isfinite(a).all(), lv
        assert float(a.min()) >= lo and float(a.max()) <= hi * (1 + 1e-6), (lv, float(a.min()), float(a.max()))
    gamma = opt.param_groups[0]["camhd_gamma"]
    assert torch.isfinite(gamma).all() and bool((gamma >= 0).all())
    assert float(gamma.sum()) == pytest.approx(1.0, abs=1e-5)
    for i, p in enumerate(model.parameters()):
        if i not in poisoned:
            assert torch.isfinite(p).all(), i


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("base", list(BASES))
def test_invariants_hold_under_injected_faults(base, impl):
    cls, kw = BASES[base]
    steps = skipped_seen = 0
    for ti, levels in enumerate(TREES):
        rng = random.Random(zlib.crc32(f"{base}/{impl}/{ti}".encode()))  # the same faults in every process
        torch.manual_seed(ti)
        model = _Small()
        L = len(levels)
        vertex = rng.random() < 0.5 and kw.get("gamma_update") != "softmax"
        gamma = [1.0] + [0.0] * (L - 1) if vertex else None
        huge = rng.random() < 0.5
        # huge rates: the normalized rule at the top of its domain (β < 1), on every other tree the additive
        # rule at β = 1e3 (its β has units and no upper bound)
        rule = "additive" if huge and ti % 2 else kw.get("hypergrad_rule", "normalized")
        beta = (1e3 if rule == "additive" else 0.999) if huge else 1e-3
        hyper = dict(hypergrad_lr=beta, gamma_lr=1e3 if huge else 0.1, decay_rate=0.01, alpha_max=kw["lr"] * 50,
                     hypergrad_rule=rule)
        opt = cls(model, levels=levels, gamma=gamma, **hyper, **kw, **IMPLS[impl])
        poisoned: set[int] = set()
        skipped_here = 0
        for t in range(STEPS):
            for i, p in enumerate(model.parameters()):
                g, bad = _fault(rng, torch.randn_like(p))
                p.grad = g
                if bad:
                    poisoned.add(i)
            opt.step()
            steps += 1
            if opt._last_hyper and not bool(opt._last_hyper["finite"]):
                skipped_here += 1
            _check(opt, model, poisoned, 0.0, hyper["alpha_max"])
        assert opt._last_path == impl
        assert opt.skipped_steps == skipped_here == opt.lr_stats()["camhd/skipped_steps"]
        skipped_seen += skipped_here
    assert steps == len(TREES) * STEPS
    assert skipped_seen > 0  # the faults did reach the hyper-update


def test_skipped_count_equals_the_non_finite_steps():
    """The count in the state is exactly the number of steps whose Σh was not finite, and survives a
    state-dict round trip."""
    torch.manual_seed(0)
    model = _Small()
    opt = CAMHDSGD(model, lr=0.05, momentum=0.9, levels=("global", "layer"), hypergrad_lr=1e-3, gamma_lr=0.1)
    rng = random.Random(0)
    expected = 0
    for t in range(60):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        if t in (5, 17, 40):  # one non-finite entry: that step's hyper-update is skipped ...
            next(model.parameters()).grad.view(-1)[rng.randrange(5)] = math.nan
        opt.step()
        if t > 0 and not bool(opt._last_hyper["finite"]):
            expected += 1
        if t in (5, 17, 40):  # ... and so are later ones until the NaN direction is gone (SGD: the next step)
            for p in model.parameters():
                p.data.nan_to_num_(0.0)
            for st in opt.state.values():
                for v in st.values():
                    if torch.is_tensor(v) and v.is_floating_point():
                        v.nan_to_num_(0.0)
    assert expected >= 3 and opt.skipped_steps == expected
    opt2 = CAMHDSGD(model, lr=0.05, momentum=0.9, levels=("global", "layer"), hypergrad_lr=1e-3, gamma_lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.skipped_steps == expected and opt2.lr_stats()["camhd/skipped_steps"] == expected


@pytest.mark.parametrize("impl", list(IMPLS))
def test_parameter_level_with_zero_weight_ignores_an_overflowing_hypergradient(impl):
    """γ_param = 0 (additive rule): the parameter level must not move, even when an element of g ⊙ u overflows
    fp32 while Σh stays finite (+9e38 and −9e38 cancel in the fused path's float64 sums) — the coefficient
    β_p γ_p = 0 times that inf was NaN in the offsets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = CAMHDSGD(model, lr=0.05, levels=("global", "layer", "parameter"), gamma=[0.5, 0.5, 0.0], gamma_lr=0.0,
                   hypergrad_rule="additive", hypergrad_lr=1e-3, **IMPLS[impl])
    for t in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        if t >= 1:  # d_1 = (3e19, 3e19), g_2 = (3e19, −3e19): g ⊙ d = (9e38, −9e38) in two entries
            model[0].weight.grad[0, :2] = torch.tensor([3e19, 3e19 if t == 1 else -3e19])
        opt.step()
    assert opt._last_path == impl
    for p in model.parameters():
        assert torch.equal(opt.state[p]["camhd_alpha_parameter_offset"], torch.zeros_like(p))
    assert all(torch.isfinite(p).all() for p in model.parameters())
