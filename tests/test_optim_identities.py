"""The identities of spec §5 that every CAM-HD implementation must satisfy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD
from hf_camhd.hierarchy import build_hierarchy

from conftest import BASES, batch, level_subsets, make_net, rel_err, train

SUBSETS = level_subsets()


# ---------------------------------------------------------------------------------------------- §5.1
PATHS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "reference": dict(foreach=False)}


@pytest.mark.parametrize("levels", SUBSETS, ids=lambda lv: "+".join(lv))
@pytest.mark.parametrize("path", ["default", "foreach"])
def test_reduces_to_base_optimizer_fp32(base, levels, path):
    """hypergrad_lr = gamma_lr = 0: parameters equal torch.optim's after 100 steps (≤ 1e-6 relative).

    The default path here is the fused kernel; the foreach path does torch's arithmetic in torch's order,
    so SGD is bitwise equal there."""
    cls, ref_cls, kw = BASES[base]
    m1, m2 = make_net(), make_net()
    gamma = [1.0 + i for i in range(len(levels))]  # any γ: the combination of equal rates is the rate
    opt = cls(m1, levels=levels, gamma=gamma, hypergrad_lr=0.0, gamma_lr=0.0, **PATHS.get(path, {}), **kw)
    ref = ref_cls(m2.parameters(), **kw)
    train(m1, opt, 100)
    train(m2, ref, 100)
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert rel_err(a, b) <= 1e-6, name
    if path == "foreach" and base.startswith("sgd") and levels == ("global",):
        # same arithmetic order as torch.optim.SGD: bitwise
        assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


@pytest.mark.parametrize("levels", [("global",), ("global", "block", "layer", "unit", "parameter")],
                         ids=["global", "all"])
@pytest.mark.parametrize("path", ["fused", "foreach", "reference"])
def test_reduces_to_base_optimizer_fp64(base, levels, path):
    cls, ref_cls, kw = BASES[base]
    m1, m2 = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    opt = cls(m1, levels=levels, hypergrad_lr=0.0, gamma_lr=0.0, **PATHS[path], **kw)
    train(m1, opt, 100, torch.float64)
    train(m2, ref_cls(m2.parameters(), **kw), 100, torch.float64)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert rel_err(a, b) <= 1e-12


def test_reduces_to_base_with_param_groups_and_scheduler():
    """Several groups with their own lr / weight decay, and a scheduler, still reproduce torch.optim."""
    m1, m2 = make_net(), make_net()

    def groups(m):
        return [{"params": list(m.features.parameters()), "lr": 2e-3, "weight_decay": 0.0},
                {"params": list(m.head.parameters()), "weight_decay": 1e-2}]
    opt = CAMHDAdamW(groups(m1), lr=1e-3, levels=("global", "layer"), hypergrad_lr=0.0)
    ref = torch.optim.AdamW(groups(m2), lr=1e-3)
    s1 = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=10, gamma=0.5)
    for t in range(40):
        for m, o, s in ((m1, opt, s1), (m2, ref, s2)):
            x, y = batch(t)
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            s.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert rel_err(a, b) <= 1e-6


# ---------------------------------------------------------------------------------------------- §5.2
def _sgd_hd_reference(params, grads_fn, lr, beta, steps):
    """Baydin et al. 2018, SGD-HD, written independently: α_t = α_{t-1} + β g_t·g_{t-1}."""
    alpha, prev = lr, None
    for t in range(steps):
        grads = grads_fn(t, params)
        if prev is not None:
            alpha = alpha + beta * sum(float((g * p).sum()) for g, p in zip(grads, prev))
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= alpha * g
        prev = [g.clone() for g in grads]
    return alpha


def _adam_hd_reference(params, grads_fn, lr, beta, steps, b1=0.9, b2=0.999, eps=1e-8):
    """Baydin et al. 2018, Adam-HD: α_t = α_{t-1} + β g_t·d_{t-1}, d = m̂/(sqrt(v̂)+ε), one α per model."""
    alpha, prev_d = lr, None
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        grads = grads_fn(t - 1, params)
        if prev_d is not None:
            alpha = alpha + beta * sum(float((g * d).sum()) for g, d in zip(grads, prev_d))
        ds = []
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            d = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
            with torch.no_grad():
                p -= alpha * d
            ds.append(d)
        prev_d = ds
    return alpha


def _grads_fn(model):
    def fn(t, params):
        x, y = batch(t, torch.float64)
        for p in model.parameters():
            p.grad = None
        nn.functional.cross_entropy(model(x), y).backward()
        return [p.grad.detach().clone() for p in model.parameters()]
    return fn


@pytest.mark.parametrize("kind", ["sgd-hd", "adam-hd"])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "reference"])
def test_global_tree_is_baydin_hd(kind, foreach):
    m_ref, m = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    if kind == "sgd-hd":
        alpha_ref = _sgd_hd_reference(list(m_ref.parameters()), _grads_fn(m_ref), 0.05, 1e-3, 25)
        opt = CAMHDSGD(m, lr=0.05, levels=("global",), hypergrad_lr=1e-3, foreach=foreach, hypergrad_rule="additive")
    else:
        alpha_ref = _adam_hd_reference(list(m_ref.parameters()), _grads_fn(m_ref), 1e-3, 1e-4, 25)
        opt = CAMHDAdam(m, lr=1e-3, levels=("global",), hypergrad_lr=1e-4, foreach=foreach, hypergrad_rule="additive")
    train(m, opt, 25, torch.float64)
    assert opt.alpha("global", dtype=torch.float64).item() == pytest.approx(alpha_ref, rel=1e-10)
    assert opt.alpha("global").item() != pytest.approx(opt.config.lr, rel=1e-3)  # it did adapt
    for a, b in zip(m.parameters(), m_ref.parameters()):
        assert rel_err(a, b) <= 1e-10


# ---------------------------------------------------------------------------------------------- §5.3
def _alpha_star(tree, levels, alphas, gamma, entry_index, shape):
    """α* of one tensor from per-level node values (differentiable in alphas and gamma)."""
    e = tree.entries[entry_index]
    out = torch.zeros(shape, dtype=torch.float64)
    for j, lv in enumerate(levels):
        if lv == "global":
            a = alphas[lv][0]
        elif lv == "block":
            a = alphas[lv][tree.entry_block[entry_index]]
        elif lv == "layer":
            a = alphas[lv][tree.entry_layer[entry_index]]
        elif lv == "unit":
            g = tree.unit_groups[tree.entry_unit_group[entry_index]]
            dim = dict(g.members)[entry_index]
            view = [1] * len(shape)
            if view:
                view[dim] = g.count
            a = alphas[lv][g.offset:g.offset + g.count].reshape(view)
        else:
            off = sum(tree.entries[k].numel for k in range(entry_index))
            a = alphas[lv][off:off + e.numel].reshape(shape)
        out = out + gamma[j] * a
    return out


@pytest.mark.parametrize("cls", [CAMHDSGD, CAMHDAdam], ids=["sgd", "adam"])
@pytest.mark.parametrize("decay_rate", [0.0, 0.05])
def test_hypergradients_match_autograd(cls, decay_rate):
    """h at every level (and ∂f/∂γ) equals autograd's derivative through one differentiable step."""
    levels = ("global", "block", "layer", "unit", "parameter")
    model = make_net(dtype=torch.float64)
    kw = dict(lr=0.05, momentum=0.5) if cls is CAMHDSGD else dict(lr=1e-2)
    beta = 1e-9  # tiny: α moves but no clamp binds, so Δα = −β_j[n] H_j[n] exactly
    opt = cls(model, levels=levels, gamma=(0.3, 0.1, 0.2, 0.15, 0.25), hypergrad_lr=beta, gamma_lr=1e-3,
              decay_rate=decay_rate, alpha_inf=0.5 * kw["lr"], hypergrad_scaling="equal", hypergrad_rule="additive",
              **kw)
    tree = opt.tree
    train(model, opt, 3, torch.float64)
    # step 4 (index 3): record θ_{t-2}, then take step t-1 and read what it stored
    theta_prev = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1, torch.float64, start=3)
    theta = [p.detach().clone() for p in model.parameters()]
    u = [opt.hypergrad_direction(p) for p in model.parameters()]
    alphas = {lv: opt.alpha(lv, dtype=torch.float64) for lv in levels}
    gamma = opt.param_groups[0]["camhd_gamma"].clone()
    tau = math.exp(-decay_rate * opt.num_steps)  # τ(t) of the step just taken (t = 1 on the first step)

    def theta_of(al, ga):
        """θ_{t-1} as a function of the rates: θ_{t-2} − s κ(α*) d with u = −s τ d."""
        out = []
        for i, (tp, ui) in enumerate(zip(theta_prev, u)):
            a_star = _alpha_star(tree, levels, al, ga, i, tp.shape)
            kappa = tau * a_star + (1 - tau) * opt.config.alpha_inf
            out.append(tp + ui / tau * kappa)
        return out

    rebuilt = theta_of(alphas, gamma)  # sanity: the stored u and α reproduce the step just taken
    for a, b in zip(rebuilt, theta):
        assert rel_err(a, b) <= 1e-10

    x, y = batch(4, torch.float64)
    names = [n for n, _ in model.named_parameters()]
    al_vars = {lv: a.clone().requires_grad_(True) for lv, a in alphas.items()}
    ga_var = gamma.clone().requires_grad_(True)
    params = dict(zip(names, theta_of(al_vars, ga_var)))
    buffers = dict(model.named_buffers())
    logits = torch.func.functional_call(model, {**params, **buffers}, (x,))
    loss = nn.functional.cross_entropy(logits, y)
    grads = torch.autograd.grad(loss, [*al_vars.values(), ga_var])
    auto = dict(zip(levels, grads[:-1]))
    auto_gamma = grads[-1]

    # the optimizer's own step t on the same batch
    train(model, opt, 1, torch.float64, start=4)
    N = tree.total_numel
    for lv in levels:
        new = opt.alpha(lv, dtype=torch.float64)
        sizes = torch.tensor([1] * N if lv == "parameter" else tree.node_sizes(lv), dtype=torch.float64)
        beta_nodes = beta * N / sizes
        H = (alphas[lv] - new) / beta_nodes
        assert rel_err(H, auto[lv]) <= 1e-5, lv
    assert rel_err(opt._last_hyper["G"], auto_gamma) <= 1e-5


# ---------------------------------------------------------------------------------------------- §5.4
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "reference"])
def test_theorem1_update_uses_combined_rate(foreach):
    """With fixed γ the update equals the one with the single per-scalar rate α* = Σ_j γ_j α_j."""
    levels = ("global", "layer", "unit", "parameter")
    model = make_net(dtype=torch.float64)
    opt = CAMHDSGD(model, lr=0.05, levels=levels, gamma=(0.4, 0.3, 0.2, 0.1), hypergrad_lr=1e-3, gamma_lr=0.0,
                   foreach=foreach)
    train(model, opt, 5, torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(5, torch.float64)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    alphas = {lv: opt.alpha(lv, dtype=torch.float64) for lv in levels}
    gamma = opt.param_groups[0]["camhd_gamma"]
    assert torch.allclose(gamma, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), rtol=0, atol=1e-15)
    for i, (b, p, g) in enumerate(zip(before, model.parameters(), grads)):
        a_star = _alpha_star(opt.tree, levels, alphas, gamma, i, b.shape)
        assert rel_err(p.detach(), b - a_star * g) <= 1e-12


@settings(max_examples=25, deadline=None)
@given(gamma=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda g: sum(g) > 1e-3),
       gamma_lr=st.sampled_from([0.0, 1e-3, 0.1, 10.0, 1e4]),
       beta=st.sampled_from([0.0, 1e-6, 1e-3, 0.999]),
       update=st.sampled_from(["clamp", "softmax"]),
       seed=st.integers(0, 3))
@pytest.mark.filterwarnings("ignore:.*hyper-gradient steps are too large:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:.*barely adapts:UserWarning")  # β = 1e-6 is one of the cases on purpose
def test_gamma_stays_on_simplex_and_alpha_nonnegative(gamma, gamma_lr, beta, update, seed):
    if update == "softmax":
        gamma = [g + 0.05 for g in gamma]
    model = make_net(seed)
    opt = CAMHDSGD(model, lr=0.05, momentum=0.9, levels=("global", "layer", "parameter"), gamma=gamma,
                   hypergrad_lr=beta, gamma_lr=gamma_lr, gamma_update=update)
    train(model, opt, 8)
    g = opt.gamma
    assert torch.isfinite(g).all() and (g >= 0).all()
    assert float(g.sum()) == pytest.approx(1.0, abs=1e-6)
    for lv in opt.levels:
        a = opt.alpha(lv)
        assert torch.isfinite(a).all() and (a >= 0).all()


def test_learned_gamma_moves_and_foreach_equals_reference_on_state():
    """foreach and reference agree in float64 on parameters AND state (u, α at every level, γ, moments)."""
    levels = ("global", "block", "layer", "unit", "parameter")
    for cls, kw in ((CAMHDAdamW, dict(lr=1e-2, weight_decay=0.1)), (CAMHDSGD, dict(lr=0.05, momentum=0.9))):
        ms = [make_net(dtype=torch.float64), make_net(dtype=torch.float64)]
        opts = [cls(m, levels=levels, hypergrad_lr=1e-4, hypergrad_rule="additive", gamma_lr=0.1, decay_rate=0.01, foreach=fe, **kw)
                for m, fe in zip(ms, (True, False))]
        for m, o in zip(ms, opts):
            train(m, o, 20, torch.float64)
        assert not torch.allclose(opts[0].gamma, torch.full((5,), 0.2))
        assert rel_err(opts[0].param_groups[0]["camhd_gamma"], opts[1].param_groups[0]["camhd_gamma"]) <= 1e-12
        for lv in levels:
            assert rel_err(opts[0].alpha(lv, dtype=None), opts[1].alpha(lv, dtype=None)) <= 1e-12
        for p, q in zip(ms[0].parameters(), ms[1].parameters()):
            assert rel_err(p, q) <= 1e-12
            s0, s1 = opts[0].state[p], opts[1].state[q]
            assert rel_err(opts[0].hypergrad_direction(p), opts[1].hypergrad_direction(q)) <= 1e-12
            for k in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                if k in s0:
                    assert rel_err(s0[k], s1[k]) <= 1e-12


@pytest.mark.parametrize("path", list(PATHS))
def test_first_step_is_the_base_optimizer(path):
    """u = 0 before the first step: nothing adapts, and the first step is the base optimizer's at the decayed
    rate κ_1 = τ(1) α₀ + (1 − τ(1)) α_∞ with τ(1) = exp(−r) (Algorithm 1 counts t from 1)."""
    m1, m2 = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    opt = CAMHDAdam(m1, lr=1e-3, levels=("global", "layer", "parameter"), hypergrad_lr=0.5, gamma_lr=1.0,
                    decay_rate=0.5, alpha_inf=1e-4, **PATHS[path])
    train(m1, opt, 1, torch.float64)
    tau = math.exp(-0.5)
    train(m2, torch.optim.Adam(m2.parameters(), lr=tau * 1e-3 + (1 - tau) * 1e-4), 1, torch.float64)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert rel_err(a, b) <= 1e-12
    assert torch.equal(opt.alpha("layer"), torch.full_like(opt.alpha("layer"), 1e-3))


def test_tree_built_from_model_covers_every_scalar_once():
    tree = build_hierarchy(make_net(), ("global", "block", "layer", "unit", "parameter"))
    n = tree.total_numel
    assert sum(tree.node_sizes("unit")) == n == sum(tree.node_sizes("layer")) == sum(tree.node_sizes("block"))
    assert tree.num_nodes("parameter") == n
