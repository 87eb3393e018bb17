"""Tests for hf_camhd.baselines: AdaBound, L4 and the baseline registry (CPU, fast)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_camhd.baselines import (
    BASELINES,
    AdaBound,
    L4,
    BaselineSpec,
    baseline_names,
    create_baseline,
    get_baseline,
    requires_loss,
    resolve_hyperparameters,
)

PAPER_NAMES = ("adam", "adamw", "sgd", "sgdn", "radam", "adabound", "adam-l4")
LR_FREE_NAMES = ("prodigy", "schedulefree-adamw", "dadapt-adam", "dog", "ldog")


# --------------------------------------------------------------------------- helpers
def _problem(seed: int = 0):
    """A tiny regression MLP on synthetic data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(128, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return x, y, model


def _train(model, opt, x, y, steps):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x), y).item()


def _quadratic_grads(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """Loss 0.5*sum(a*(p-b)^2) (>= 0) and its gradient, float64."""
    loss = 0.5 * (a * (p - b) ** 2).sum()
    return loss, a * (p - b)


# --------------------------------------------------------------------------- every baseline trains
@pytest.mark.parametrize("name", PAPER_NAMES)
def test_each_baseline_reduces_the_loss(name):
    x, y, model = _problem()
    with torch.no_grad():
        initial = torch.nn.functional.mse_loss(model(x), y).item()
    opt = create_baseline(name, model.parameters())
    final = _train(model, opt, x, y, steps=300)
    assert math.isfinite(final)
    assert final < 0.5 * initial, (name, initial, final)


# --------------------------------------------------------------------------- AdaBound
def _adabound_reference(p0, grads, lrs, *, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8,
                        weight_decay=0.0, amsbound=False):
    """Hand-written AdaBound (Luolc/AdaBound reference update), float64, plain tensors."""
    beta1, beta2 = betas
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    vmax = torch.zeros_like(p)
    base_lr = lrs[0]
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        vmax = torch.maximum(vmax, v)
        denom = (vmax if amsbound else v).sqrt() + eps
        step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        eta_star = final_lr * lr / base_lr
        lower = eta_star * (1 - 1 / (gamma * t + 1))
        upper = eta_star * (1 + 1 / (gamma * t))
        p = p - torch.clamp(step_size / denom, lower, upper) * m
        out.append(p.clone())
    return out


@pytest.mark.parametrize("amsbound", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adabound_matches_hand_written_update(amsbound, weight_decay):
    gen = torch.Generator().manual_seed(1)
    p0 = torch.randn(4, 3, dtype=torch.float64, generator=gen)
    grads = [torch.randn(4, 3, dtype=torch.float64, generator=gen) * s for s in (1.0, 0.1, 3.0, 0.01, 1.0, 0.5)]
    # a large gamma makes the bound band narrow quickly, so the clipping is actually exercised;
    # the lr change at step 4 exercises the final_lr * lr / base_lr rescaling
    lrs = [1e-2, 1e-2, 1e-2, 5e-3, 5e-3, 5e-3]
    kw = dict(betas=(0.9, 0.999), final_lr=0.05, gamma=0.5, eps=1e-8, weight_decay=weight_decay,
              amsbound=amsbound)
    expected = _adabound_reference(p0, grads, lrs, **kw)

    p = torch.nn.Parameter(p0.clone())
    opt = AdaBound([p], lr=lrs[0], **kw)
    clipped = False
    for g, lr, want in zip(grads, lrs, expected):
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        before = p.detach().clone()
        opt.step()
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
        # check that the clip bound was hit at least once somewhere (the test is not plain Adam)
        m = opt.state[p]["exp_avg"]
        ratio = ((before - p.detach()) / m).abs()
        t = opt.state[p]["step"]
        eta_star = kw["final_lr"] * lr / lrs[0]
        upper = eta_star * (1 + 1 / (kw["gamma"] * t))
        lower = eta_star * (1 - 1 / (kw["gamma"] * t + 1))
        clipped |= bool(((ratio - upper).abs() < 1e-9 * upper).any() | ((ratio - lower).abs() < 1e-9 * upper).any())
    assert clipped
    assert opt.param_groups[0]["base_lr"] == lrs[0]


def test_adabound_defaults_and_validation():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AdaBound([p])
    d = opt.defaults
    assert (d["lr"], d["final_lr"], d["gamma"], d["betas"], d["eps"], d["weight_decay"], d["amsbound"]) == (
        1e-3, 0.1, 1e-3, (0.9, 0.999), 1e-8, 0.0, False)
    assert AdaBound.requires_loss is False
    for bad in (dict(lr=-1.0), dict(final_lr=-0.1), dict(gamma=0.0), dict(gamma=1.0), dict(betas=(1.0, 0.9)),
                dict(eps=-1.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError):
            AdaBound([p], **bad)


def test_adabound_matches_pytorch_optimizer_if_installed():
    po = pytest.importorskip("pytorch_optimizer")
    gen = torch.Generator().manual_seed(3)
    p1 = torch.nn.Parameter(torch.randn(6, dtype=torch.float64, generator=gen))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = AdaBound([p1], lr=1e-2, final_lr=0.05, gamma=0.1)
    o2 = po.AdaBound([p2], lr=1e-2, final_lr=0.05, gamma=0.1, weight_decouple=False)
    for _ in range(20):
        g = torch.randn(6, dtype=torch.float64, generator=gen)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- L4
def _l4_reference(p0, losses_and_grads, *, alpha=0.15, betas=(0.9, 0.999), adam_eps=1e-4, grad_beta=0.9,
                  gamma=0.9, gamma0=0.75, tau=1000.0, eps=1e-12):
    """Hand-written L4Adam following martius-lab/l4-optimizer (L4General + AdamTransform +
    MomentumTransform), float64. ``losses_and_grads(p)`` returns (loss, grad) at p."""
    beta1, beta2 = betas
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    mg = torch.zeros_like(p)
    l_min = None
    trace = []
    for t in range(1, 6):
        loss, g = losses_and_grads(p)
        loss = float(loss)
        l_min = gamma0 * loss if l_min is None else min(l_min, loss)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        mg = grad_beta * mg + (1 - grad_beta) * g
        d = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + adam_eps)
        g_hat = mg / (1 - grad_beta ** t)
        eta = alpha * (loss - gamma * l_min) / ((g_hat * d).sum().item() + eps)
        p = p - eta * d
        l_min = (1 + 1 / tau) * l_min
        trace.append((p.clone(), eta, l_min))
    return trace


def test_l4_first_step_size_is_alpha_loss_gap_over_g_dot_d():
    a = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    opt = L4([p])  # paper / reference defaults
    assert L4.requires_loss is True and requires_loss(opt)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (a * (p - b) ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss0, g = _quadratic_grads(p.detach(), a, b)
    loss0 = float(loss0)
    # first step: m_hat = g, v_hat = g^2, so d = g / (|g| + 1e-4); g_hat = g; L_min = 0.75 * L
    d = g / (g.abs() + 1e-4)
    l_min = 0.75 * loss0
    eta = 0.15 * (loss0 - 0.9 * l_min) / (float((g * d).sum()) + 1e-12)
    p_before = p.detach().clone()
    returned = opt.step(closure)
    assert float(returned.detach()) == pytest.approx(loss0, rel=1e-15)
    assert opt.last_step_size == pytest.approx(eta, rel=1e-12)
    assert opt.param_groups[0]["l4_eta"] == pytest.approx(eta, rel=1e-12)
    torch.testing.assert_close(p.detach(), p_before - eta * d, rtol=1e-12, atol=1e-14)
    assert opt.l_min == pytest.approx((1 + 1 / 1000.0) * l_min, rel=1e-14)
    assert opt.param_groups[0]["l4_step"] == 1


@pytest.mark.parametrize("grad_beta", [0.9, 0.5])
def test_l4_matches_hand_written_reference_over_several_steps(grad_beta):
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(5, dtype=torch.float64, generator=gen) + 0.5
    b = torch.randn(5, dtype=torch.float64, generator=gen)
    p0 = torch.randn(5, dtype=torch.float64, generator=gen)
    expected = _l4_reference(p0, lambda q: _quadratic_grads(q, a, b), alpha=0.2, grad_beta=grad_beta)

    p = torch.nn.Parameter(p0.clone())
    opt = L4([p], alpha=0.2, grad_beta=grad_beta)
    for want_p, want_eta, want_lmin in expected:
        def closure():
            loss, g = _quadratic_grads(p.detach(), a, b)
            p.grad = g
            return loss.item()  # a plain float is accepted
        opt.step(closure)
        torch.testing.assert_close(p.detach(), want_p, rtol=1e-10, atol=1e-12)
        assert opt.last_step_size == pytest.approx(want_eta, rel=1e-10)
        assert opt.l_min == pytest.approx(want_lmin, rel=1e-12)
    assert ("grad_avg" in opt.state[p]) == (grad_beta != 0.9)


def test_l4_needs_the_loss_and_rejects_bad_losses():
    p = torch.nn.Parameter(torch.ones(3))
    opt = L4([p])
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="None"):
        opt.step(lambda: None)
    with pytest.raises(ValueError, match="non-negative"):
        opt.step(lambda: torch.tensor(-1.0))
    # non-finite loss: skipped, nothing changes
    before = p.detach().clone()
    assert math.isnan(opt.step(lambda: float("nan")))
    assert torch.equal(p.detach(), before) and len(opt.state) == 0 and opt.l_min is None
    with pytest.raises(ValueError):
        L4([p], direction="sgd")
    with pytest.raises(ValueError):
        L4([p], alpha=-0.1)


def test_l4_param_groups_share_global_settings_and_scale_by_group_lr():
    p1 = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = L4([{"params": [p1]}, {"params": [p2], "alpha": 0.05}], alpha=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.05]
    p1.grad = torch.tensor([1.0, -2.0], dtype=torch.float64)
    p2.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    opt.step(lambda: 1.0)
    e1, e2 = (g["l4_eta"] for g in opt.param_groups)
    assert e2 == pytest.approx(0.5 * e1, rel=1e-14)
    assert opt.param_groups[0]["l_min"] == opt.param_groups[1]["l_min"]
    with pytest.raises(ValueError, match="gamma"):
        L4([{"params": [p1]}, {"params": [p2], "gamma": 0.5}])


def test_l4_momentum_direction_and_lr_scheduler():
    x, y, model = _problem(1)
    opt = L4(model.parameters(), direction="momentum")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    with torch.no_grad():
        initial = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(100):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(lambda: loss.detach())
        sched.step()
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    assert final < 0.5 * initial
    assert opt.param_groups[0]["lr"] == pytest.approx(0.15 * 0.25)
    assert "exp_avg_sq" not in opt.state[next(iter(model.parameters()))]


# --------------------------------------------------------------------------- state_dict round trip
@pytest.mark.parametrize("name", ["adabound", "adam-l4"])
def test_state_dict_round_trip_continues_identically(name):
    x, y, model = _problem(3)
    kw = {"lr": 2e-2} if name == "adabound" else {}
    opt = create_baseline(name, model.parameters(), **kw)
    _train(model, opt, x, y, steps=7)
    if name == "adabound":  # a scheduler-changed lr must keep scaling final_lr after the reload
        for g in opt.param_groups:
            g["lr"] = 1e-2

    model_b = copy.deepcopy(model)
    sd = copy.deepcopy(opt.state_dict())
    # build the clone with *different* constructor values: everything must come from the state dict
    other = {"lr": 5e-3} if name == "adabound" else {"alpha": 0.3}
    opt_b = create_baseline(name, model_b.parameters(), **other)
    opt_b.load_state_dict(sd)
    if name == "adabound":
        assert opt_b.param_groups[0]["base_lr"] == 2e-2
    else:
        assert opt_b.l_min == opt.l_min and opt_b.param_groups[0]["l4_step"] == 7

    loss_a = _train(model, opt, x, y, steps=5)
    loss_b = _train(model_b, opt_b, x, y, steps=5)
    assert loss_a == loss_b
    for pa, pb in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


# --------------------------------------------------------------------------- registry
def test_registry_names_and_display_names():
    assert baseline_names() == PAPER_NAMES + LR_FREE_NAMES
    assert set(BASELINES) == set(PAPER_NAMES + LR_FREE_NAMES)
    displays = {n: s.display_name for n, s in BASELINES.items()}
    assert displays == {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "sgdn": "SGDN", "radam": "RAdam",
                        "adabound": "AdaBound", "adam-l4": "Adam-L4", "prodigy": "Prodigy",
                        "schedulefree-adamw": "Schedule-Free AdamW", "dadapt-adam": "D-Adapt Adam", "dog": "DoG",
                        "ldog": "LDoG"}
    for name, spec in BASELINES.items():
        assert isinstance(spec, BaselineSpec) and spec.name == name
        with pytest.raises(Exception):
            spec.name = "x"  # frozen
        with pytest.raises(TypeError):
            spec.hyperparameters["lr"] = 1.0  # read-only mapping
    assert [n for n, s in BASELINES.items() if s.requires_loss] == ["adam-l4"]


@pytest.mark.parametrize("name, cls, expected", [
    ("adam", torch.optim.Adam, {"lr": 1e-3}),
    ("adamw", torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 1e-2}),
    ("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": False}),
    ("sgdn", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("radam", torch.optim.RAdam, {"lr": 1e-3}),
    ("adabound", AdaBound, {"lr": 1e-3, "final_lr": 0.1, "gamma": 1e-3}),
    ("adam-l4", L4, {"lr": 0.15, "direction": "adam"}),
])
def test_each_name_builds_with_paper_defaults(name, cls, expected):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = create_baseline(name, [p])
    assert type(opt) is cls
    for k, v in expected.items():
        assert opt.defaults[k] == v, (name, k)
    assert requires_loss(opt) == (name == "adam-l4")


def test_overrides_apply():
    p = torch.nn.Parameter(torch.zeros(3))
    assert create_baseline("adam", [p], lr=3e-4, betas=(0.8, 0.99)).defaults["betas"] == (0.8, 0.99)
    opt = create_baseline("sgdn", [p], lr=0.05, weight_decay=5e-4)
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["nesterov"],
            opt.defaults["weight_decay"]) == (0.05, 0.9, True, 5e-4)
    assert create_baseline("adabound", [p], final_lr=0.01).defaults["final_lr"] == 0.01
    assert create_baseline("adam-l4", [p], alpha=0.25).defaults["lr"] == 0.25
    assert create_baseline("adam-l4", [p], lr=0.2).defaults["lr"] == 0.2  # lr is an alias of alpha
    assert resolve_hyperparameters("adamw", lr=5e-4) == {"lr": 5e-4, "weight_decay": 1e-2}
    # defaults are not mutated by overrides
    assert BASELINES["adam"].hyperparameters["lr"] == 1e-3
    # lookup by display name / aliases, any case
    assert get_baseline("Adam-L4").name == "adam-l4"
    assert get_baseline("SGD-Nesterov").name == "sgdn"
    assert get_baseline("L4").name == "adam-l4"
    assert type(create_baseline("AdamW", [p])) is torch.optim.AdamW


def test_bad_name_and_bad_keyword_errors():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError) as err:
        create_baseline("adagrad", [p])
    for name in PAPER_NAMES:
        assert name in str(err.value)
    with pytest.raises(TypeError, match="'momentum'"):
        create_baseline("adam", [p], momentum=0.9)
    with pytest.raises(TypeError, match="'final_lr'"):
        create_baseline("sgd", [p], final_lr=0.1)
    with pytest.raises(TypeError, match="'weight_decay'"):
        create_baseline("adam-l4", [p], weight_decay=1e-4)
    with pytest.raises(TypeError, match="same hyper-parameter"):
        create_baseline("adam-l4", [p], lr=0.1, alpha=0.2)


# --------------------------------------------------------------------------- learning-rate-free baselines
@pytest.mark.parametrize("name", LR_FREE_NAMES)
def test_each_learning_rate_free_baseline_reduces_the_loss_at_its_readme_settings(name):
    x, y, model = _problem()
    opt = create_baseline(name, model.parameters())
    if name == "schedulefree-adamw":
        opt.train()  # Schedule-Free: train() before stepping (step() raises otherwise)
    with torch.no_grad():
        initial = torch.nn.functional.mse_loss(model(x), y).item()
    final = _train(model, opt, x, y, steps=300)
    assert final < 0.5 * initial, (name, initial, final)


@pytest.mark.parametrize("name, cls, expected", [
    ("prodigy", "prodigyopt.Prodigy", {"lr": 1.0, "d0": 1e-6, "safeguard_warmup": False}),
    ("schedulefree-adamw", "schedulefree.AdamWScheduleFree", {"lr": 0.0025, "warmup_steps": 0}),
    ("dadapt-adam", "dadaptation.DAdaptAdam", {"lr": 1.0, "decouple": False}),
    ("dog", "dog.DoG", {"lr": 1.0, "reps_rel": 1e-6}),
    ("ldog", "dog.LDoG", {"lr": 1.0, "reps_rel": 1e-6}),
])
def test_learning_rate_free_names_build_their_packages_classes(name, cls, expected):
    import importlib

    module, attr = cls.rsplit(".", 1)
    opt = create_baseline(name, [torch.nn.Parameter(torch.zeros(3))])
    assert type(opt) is getattr(importlib.import_module(module), attr)
    for k, v in expected.items():
        assert opt.defaults[k] == v, (name, k)
    with pytest.raises(TypeError, match=r"'momentum'; accepted: "):  # keywords checked against the real class
        create_baseline(name, [torch.nn.Parameter(torch.zeros(3))], momentum=0.9)


def test_a_missing_package_is_one_error_naming_the_extra(monkeypatch):
    import sys

    from hf_camhd._extras import MissingDependencyError

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if not installed
    with pytest.raises(MissingDependencyError,
                       match=r"^the prodigy baseline needs prodigyopt, which is not installed: "
                             r"pip install 'hf_camhd\[experiments\]'$"):
        create_baseline("prodigy", [torch.nn.Parameter(torch.zeros(3))])
    assert create_baseline("adam", [torch.nn.Parameter(torch.zeros(3))])  # the others need nothing more
