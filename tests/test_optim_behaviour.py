"""Bad input, faults, the sign of adaptation, convergence, and the registry."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD, create_optimizer, list_optimizers
from hf_camhd.optim._state import ALPHA_OFFSET

from conftest import batch, level_subsets, make_net, train


def _linear():
    torch.manual_seed(0)
    return nn.Linear(3, 2)


# ------------------------------------------------------------------------------------------ bad input
# (constructor, kwargs, exception, message regex)
ERRORS = [
    (CAMHDAdam, dict(lr=-1.0), ValueError, r"Invalid learning rate: -1.0"),
    (CAMHDAdam, dict(lr=0.0), ValueError, r"Invalid learning rate: 0.0"),
    (CAMHDAdam, dict(hypergrad_lr=-1.0), ValueError, r"Invalid hypergrad_lr value: -1.0"),
    (CAMHDAdam, dict(gamma_lr=-0.5), ValueError, r"Invalid gamma_lr value: -0.5"),
    (CAMHDAdam, dict(decay_rate=-0.1), ValueError, r"Invalid decay_rate value: -0.1"),
    (CAMHDAdam, dict(alpha_inf=-1e-3), ValueError, r"Invalid alpha_inf value"),
    (CAMHDAdam, dict(levels=("global", "layer"), gamma=(1.0,)), ValueError,
     r"Invalid gamma: must have one weight per level \(2 levels"),
    (CAMHDAdam, dict(levels=("global", "layer"), gamma=(1.5, -0.5)), ValueError, r"Invalid gamma: weight 1 .*-0.5"),
    (CAMHDAdam, dict(levels=("global", "layer"), gamma=(0.0, 0.0)), ValueError, r"Invalid gamma: .* sums to 0"),
    (CAMHDAdam, dict(levels=("global", "layer"), gamma=(0.0, 1.0), gamma_update="softmax"), ValueError,
     r"gamma_update='softmax' needs every weight > 0"),
    (CAMHDAdam, dict(levels=("global", "layers")), ValueError,
     r"Unknown level 'layers'; expected one of global, block, layer, unit, parameter"),
    (CAMHDAdam, dict(levels=("layer", "global")), ValueError, r"levels must be ordered|first level must be 'global'"),
    (CAMHDAdam, dict(levels=("global", "unit", "layer")), ValueError, r"levels must be ordered coarse to fine"),
    (CAMHDAdam, dict(levels=("layer",)), ValueError, r"first level must be 'global'"),
    (CAMHDAdam, dict(levels=()), ValueError, r"Invalid levels: empty"),
    (CAMHDAdam, dict(hypergrad_scaling="mean"), ValueError, r"Invalid hypergrad_scaling: 'mean'"),
    (CAMHDAdam, dict(gamma_update="renorm"), ValueError, r"Invalid gamma_update: 'renorm'"),
    (CAMHDAdam, dict(betas=(1.0, 0.999)), ValueError, r"Invalid beta parameter at index 0: 1.0"),
    (CAMHDAdam, dict(eps=-1e-8), ValueError, r"Invalid epsilon value: -1e-08"),
    (CAMHDAdam, dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay value: -0.1"),
    (CAMHDAdam, dict(alpha_min=-1.0), ValueError, r"Invalid alpha_min value: -1.0"),
    (CAMHDAdam, dict(alpha_max=1e-4), ValueError, r"Invalid alpha_max value: 0.0001"),
    (CAMHDAdam, dict(foreach="yes"), ValueError, r"Invalid foreach: 'yes'"),
    (CAMHDSGD, dict(momentum=-0.9), ValueError, r"Invalid momentum value: -0.9"),
    (CAMHDSGD, dict(nesterov=True), ValueError, r"Nesterov momentum requires a momentum"),
    (CAMHDAdamW, dict(lr=torch.tensor([1e-3, 2e-3])), ValueError, r"a Tensor lr must hold one real number"),
    (CAMHDAdamW, dict(hypergrad_lr=torch.tensor(1e-3)), ValueError,
     r"Invalid hypergrad_lr: hypergrad_lr must be a Python float, got a Tensor .*pass float\(hypergrad_lr\)"),
]


@pytest.mark.parametrize("cls,kwargs,exc,msg", ERRORS, ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _, _ in ERRORS])
def test_invalid_arguments(cls, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        cls(_linear(), **kwargs)


def test_block_level_needs_module_structure():
    with pytest.raises(ValueError, match="'block' requested for plain params"):
        CAMHDAdam(list(_linear().parameters()), levels=("global", "block"))


@pytest.mark.parametrize("params", [[], nn.Linear(2, 2).requires_grad_(False)], ids=["empty", "all-frozen"])
def test_empty_parameter_list(params):
    with pytest.raises(ValueError, match="Invalid params: .*(empty|no trainable)"):
        CAMHDAdam(params)


def test_sparse_gradients_raise_at_step():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = CAMHDAdam(emb)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="does not support sparse gradients .*'weight'"):
        opt.step()


def test_registry_fixed_settings_cannot_be_overridden():
    with pytest.raises(ValueError, match="Invalid levels for 'adam-hd'"):
        create_optimizer(_linear(), "adam-hd", levels=("global", "layer"))
    with pytest.raises(ValueError, match="Unknown optimizer 'adam-camhdx'"):
        create_optimizer(_linear(), "adam-camhdx")


# ------------------------------------------------------------------------------------------ faults
NON_FINITE_BASES = {"sgd-momentum": (CAMHDSGD, dict(lr=0.05, momentum=0.9)),
                    "adamw": (CAMHDAdamW, dict(lr=1e-3, weight_decay=1e-2))}


@pytest.mark.parametrize("path", ["multi_tensor", "reference", "fused_cpu"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("rule", ["additive", "normalized"])
@pytest.mark.parametrize("base", list(NON_FINITE_BASES))
def test_non_finite_gradients_never_poison_alpha(path, bad, rule, base):
    levels = ("global", "block", "layer", "unit", "parameter")
    flags = {"reference": dict(foreach=False), "fused_cpu": dict(fused=True)}.get(path, dict(foreach=True))
    m = make_net()
    cls, kw = NON_FINITE_BASES[base]
    opt = cls(m, levels=levels, hypergrad_lr=1e-3 if rule == "additive" else 0.01, gamma_lr=0.05,
              hypergrad_rule=rule, **kw, **flags)
    train(m, opt, 3)
    snapshot = {lv: opt.alpha(lv) for lv in levels}
    gamma = opt.gamma
    twin_m, twin = copy.deepcopy((m, opt))  # takes the same step without the poisoned entry

    def poison(t, model):
        model.features[3].weight.grad[0, 0, 0, 0] = bad

    train(m, opt, 1, start=3, closure_hook=poison)
    train(twin_m, twin, 1, start=3)
    assert opt._last_path == path
    assert opt._last_hyper["finite"].item() is False
    assert opt.skipped_steps == 1 and opt.lr_stats()["camhd/skipped_steps"] == 1
    for lv in levels[:-1]:  # the hyper-update was skipped: α of every coarse level and γ are exactly as before
        assert torch.equal(opt.alpha(lv), snapshot[lv]), lv
    assert torch.equal(opt.gamma, gamma)
    # the parameter level is element-wise: the poisoned entry keeps its rate, every other one moves exactly as in
    # the twin's step (whose coefficient is the same γ_param of step t−1)
    alpha, moved = opt.alpha("parameter"), twin.alpha("parameter")
    differs = alpha != moved
    assert int(differs.sum()) <= 1 and torch.equal(alpha[differs], snapshot["parameter"][differs])
    assert not torch.equal(moved, snapshot["parameter"])
    # the parameters are now non-finite (as with any optimizer); later steps still keep α sane
    train(m, opt, 3, start=4)
    for lv in levels:
        a = opt.alpha(lv)
        assert torch.isfinite(a).all() and (a >= 0).all(), lv
    assert torch.isfinite(opt.gamma).all() and float(opt.gamma.sum()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*hyper-gradient steps are too large:RuntimeWarning")
@pytest.mark.parametrize("rule, beta", [("additive", 1e6), ("normalized", 0.999)])
def test_alpha_floor_and_ceiling_hold_under_huge_hypergradient_rates(rule, beta):
    m = make_net()
    opt = CAMHDSGD(m, lr=0.05, levels=("global", "layer", "unit", "parameter"), hypergrad_lr=beta, gamma_lr=0.0,
                   alpha_max=0.2, hypergrad_rule=rule)
    train(m, opt, 6)
    for lv in opt.levels:
        a = opt.alpha(lv)
        assert (a >= 0).all() and (a <= 0.2 + 1e-7).all(), lv


# ------------------------------------------------------------------------------------------ sign test
@pytest.mark.parametrize("cls,lr_small,lr_big", [(CAMHDSGD, 0.01, 1.9), (CAMHDAdam, 1e-3, 5.0)])
def test_rate_rises_when_gradients_agree_and_falls_when_they_oppose(cls, lr_small, lr_big):
    """On f(x) = ½‖x‖²: a small step keeps successive gradients aligned (g·u < 0 → α grows); an
    overshooting step flips them (g·u > 0 → α shrinks)."""
    for lr, rises in ((lr_small, True), (lr_big, False)):
        x = nn.Parameter(torch.full((4,), 3.0))
        opt = cls([x], lr=lr, levels=("global", "layer"), hypergrad_lr=1e-4, hypergrad_rule="additive")
        for _ in range(4):
            opt.zero_grad()
            (0.5 * x.pow(2).sum()).backward()
            opt.step()
        a = opt.alpha("layer").item()
        assert (a > lr) if rises else (a < lr), (lr, a)


# ------------------------------------------------------------------------------------------ convergence
OPTIMIZERS = {
    "sgd": (CAMHDSGD, dict(lr=0.05, hypergrad_lr=1e-4, hypergrad_rule="additive")),
    "sgdn": (CAMHDSGD, dict(lr=0.02, momentum=0.9, nesterov=True, hypergrad_lr=1e-5, hypergrad_rule="additive")),
    "adam": (CAMHDAdam, dict(lr=0.05, hypergrad_lr=1e-6, hypergrad_rule="additive")),
    "adamw": (CAMHDAdamW, dict(lr=0.05, weight_decay=1e-4, hypergrad_lr=1e-6, hypergrad_rule="additive")),
}


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("levels", level_subsets(), ids=lambda lv: "+".join(lv))
def test_loss_falls_on_linear_regression(name, levels):
    cls, kw = OPTIMIZERS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = x @ torch.randn(5, 1, generator=g) + 0.1
    torch.manual_seed(0)
    model = _Regression()
    opt = cls(model, levels=levels, gamma_lr=0.01, **kw)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("levels", [("global",), ("global", "layer"), ("global", "unit"),
                                    ("global", "layer", "parameter"), ("global", "layer", "unit", "parameter")],
                         ids=lambda lv: "+".join(lv))
def test_loss_falls_on_rosenbrock(name, levels):
    cls, kw = OPTIMIZERS[name]
    # Rosenbrock's gradients are ~10² at the start: smaller base and hyper-gradient rates
    kw = dict(kw, lr=1e-3 if cls is CAMHDSGD else 0.02, hypergrad_lr=1e-9 if cls is CAMHDSGD else 1e-6)
    xy = nn.Parameter(torch.tensor([-1.2, 1.0]))

    def f():
        return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2
    opt = cls([xy], levels=levels, **kw)
    start = f().item()
    for _ in range(400):
        opt.zero_grad()
        loss = f()
        loss.backward()
        opt.step()
    assert f().item() < 0.25 * start


def test_registry_builds_every_name():
    for name in list_optimizers():
        m = make_net()
        opt = create_optimizer(m, name, lr=1e-2)
        if hasattr(opt, "train"):  # Schedule-Free: train mode before training
            opt.train()
        train(m, opt, 2)
        assert opt.num_steps == 2
        if name.endswith("-hd"):
            assert opt.levels == ("global",)
        if name.startswith("sgdn"):
            assert opt.param_groups[0]["nesterov"] is True
    assert {"sgd-camhd", "sgdn-camhd", "adam-camhd", "adamw-camhd", "sgd-hd", "adam-hd"} <= set(list_optimizers())


def test_repr_and_readers():
    m = make_net()
    opt = CAMHDAdam(m, levels=("global", "layer", "unit"), gamma=(0.5, 0.3, 0.2))
    text = repr(opt)
    assert "levels: global, layer, unit" in text and "camhd_tree" not in text
    assert opt.levels == ("global", "layer", "unit")
    assert opt.gamma.dtype == torch.float32 and opt.gamma.tolist() == pytest.approx([0.5, 0.3, 0.2])
    assert opt.alpha("unit").shape == (opt.tree.num_nodes("unit"),)
    with pytest.raises(ValueError, match="Level 'parameter' is not in this tree"):
        opt.alpha("parameter")
    x, y = batch(0)
    del x, y


@pytest.mark.parametrize("rule", ["additive", "normalized"])
def test_a_rate_pushed_to_alpha_max_is_reported_once_naming_the_level(rule):
    m = make_net()
    beta = 10.0 if rule == "additive" else 0.9
    opt = CAMHDSGD(m, lr=0.05, momentum=0.9, levels=("global", "layer"), hypergrad_lr=beta, alpha_max=0.06,
                   hypergrad_rule=rule)
    fix = r"Lower hypergrad_lr \(now " + f"{beta:g}" + r"\)" + (", or use hypergrad_rule='normalized'" if rule == "additive" else
                                                           r"; or raise alpha_max")
    with pytest.warns(RuntimeWarning, match=r"CAMHDSGD: the learned rate of level '(global|layer)' reached "
                                            r"alpha_max=0\.06 \(step \d+\).*" + fix):
        train(m, opt, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        train(m, opt, 20, start=20)


@pytest.mark.parametrize("cls", [CAMHDSGD, CAMHDAdam, CAMHDAdamW])
def test_normalized_rule_takes_beta_below_one_where_every_rate_stays_positive(cls):
    """α ← α (1 − β c) with c in [−1, 1]: at β ≥ 1 a step can zero a rate (a multiplicative rule never moves it again),
    so β ≥ 1 is refused with the fix; just below 1 every rate at every level stays positive."""
    with pytest.raises(ValueError, match=r"^Invalid hypergrad_lr value: 1 with hypergrad_rule='normalized' \(must be "
                                         r"in \[0, 1\)\).*Use a fraction, e\.g\. the default 0\.01; for the "
                                         r"paper's additive rule and its β, pass hypergrad_rule='additive'\.$"):
        cls(make_net(), levels=("global", "layer"), hypergrad_lr=1.0)
    cls(make_net(), levels=("global", "layer"), hypergrad_lr=1.0, hypergrad_rule="additive")  # its β has units
    m = make_net()
    levels = ("global", "layer", "unit", "parameter")
    opt = cls(m, lr=0.05, levels=levels, hypergrad_lr=0.999, hypergrad_smoothing=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the rates swing by up to 99.9 % per step, as asked
        train(m, opt, 30)
    for lv in levels[:3]:
        assert (opt.alpha(lv) > 0).all(), lv
    # the parameter level stores α − α₀: a rate below α₀ times the dtype's eps rounds to 0 there (its sign steps
    # are ±1 every step, so at β = 0.999 some do get that small), never below
    rates = [opt.state[p][ALPHA_OFFSET] + 0.05 for p in m.parameters()]
    assert all(torch.isfinite(r).all() and (r >= 0).all() for r in rates)
    assert sum(int((r > 0).sum()) for r in rates) > 0


def test_no_warning_when_the_rates_stay_sane():
    m = make_net()
    opt = CAMHDAdam(m, levels=("global", "layer", "unit", "parameter"), hypergrad_lr=1e-8, hypergrad_rule="additive", gamma_lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(m, opt, 30)
        opt.lr_stats()
