"""Which previous directions the state keeps: CAMHDAdam and heavy-ball CAMHDSGD rebuild u_{t-1}'s direction from
the base rule's own state (Adam's moments, the momentum buffer), so their state is torch's; the other rules keep
it. A state dict that still holds a direction the rule now rebuilds (an older version's) loads and continues, and
a change of settings that ends the rebuilding (momentum → Nesterov) keeps the direction from then on."""

from __future__ import annotations

import pytest
import torch

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD, CAMHDScheduleFreeAdamW

from conftest import make_net, rel_err, torch_roundtrip, train

KEPT = "hypergrad_dir"
LEVELS = ("global", "layer", "unit")
RULES = {
    # name: (class, kwargs, torch counterpart, whether the direction is rebuilt)
    "adam": (CAMHDAdam, dict(lr=1e-3, weight_decay=1e-3), torch.optim.Adam, True),
    "adam-amsgrad": (CAMHDAdam, dict(lr=1e-3, amsgrad=True), torch.optim.Adam, True),
    "sgd-momentum": (CAMHDSGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3), torch.optim.SGD, True),
    "adamw": (CAMHDAdamW, dict(lr=1e-3, weight_decay=1e-2), torch.optim.AdamW, False),
    "sgdn": (CAMHDSGD, dict(lr=0.05, momentum=0.9, nesterov=True), torch.optim.SGD, False),
    "sgd": (CAMHDSGD, dict(lr=0.05), torch.optim.SGD, False),
    "sf-adamw": (CAMHDScheduleFreeAdamW, dict(lr=2.5e-3), None, False),
}


def _param_sized_bytes(opt, model) -> int:
    """Bytes of every state tensor shaped like its parameter (what scales with the model)."""
    return sum(v.numel() * v.element_size() for p in model.parameters() for v in opt.state[p].values()
               if torch.is_tensor(v) and v.shape == p.shape)


@pytest.mark.parametrize("name", list(RULES))
def test_state_keeps_a_direction_only_where_the_rule_cannot_rebuild_it(name):
    cls, kw, torch_cls, rebuilt = RULES[name]
    model = make_net()
    opt = cls(model, levels=LEVELS, **kw)
    if hasattr(opt, "train"):
        opt.train()  # Schedule-Free
    train(model, opt, 3)
    for p in model.parameters():
        assert (KEPT in opt.state[p]) is (not rebuilt), name
        u = opt.hypergrad_direction(p)
        assert u.shape == p.shape and torch.isfinite(u).all() and u.abs().sum() > 0
    if torch_cls is not None and rebuilt:  # without parameter / unit levels: the same optimizer memory as torch's
        model, ref_model = make_net(), make_net()
        opt, ref = cls(model, levels=("global", "block", "layer"), **kw), torch_cls(ref_model.parameters(), **kw)
        train(model, opt, 3)
        train(ref_model, ref, 3)
        assert _param_sized_bytes(opt, model) == sum(
            v.numel() * v.element_size() for s in ref.state.values() for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0)


@pytest.mark.parametrize("impl", [dict(fused=True), dict(foreach=True), dict(foreach=False)],
                         ids=["fused", "foreach", "reference"])
@pytest.mark.parametrize("name", ["adam", "adam-amsgrad", "sgd-momentum"])
def test_rebuilt_direction_is_the_last_update_per_unit_rate(name, impl):
    """u_{t-1} = ∂θ_{t-1}/∂α*: with nothing adapting and no decay, θ_{t-1} − θ_{t-2} = α₀ · u_{t-1}."""
    cls, kw, _, _ = RULES[name]
    model = make_net(dtype=torch.float64)
    opt = cls(model, levels=("global",), hypergrad_lr=0.0, gamma_lr=0.0, **kw, **impl)
    train(model, opt, 4, torch.float64)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, 1, torch.float64, start=4)
    for p, b in zip(model.parameters(), before):
        assert rel_err(p - b, kw["lr"] * opt.hypergrad_direction(p)) <= 1e-12


@pytest.mark.parametrize("name", ["adam", "sgd-momentum"])
def test_state_dict_with_a_kept_direction_loads_and_drops_it(name):
    """An older version kept the direction for every rule: such a state dict continues exactly as the run that
    never saved, and the kept direction is gone after the first step."""
    cls, kw, _, _ = RULES[name]
    kw = dict(kw, hypergrad_lr=1e-2, gamma_lr=0.05)
    m_ref, m_old = make_net(), make_net()
    o_ref = cls(m_ref, levels=LEVELS, **kw)
    train(m_ref, o_ref, 6)
    o_first = cls(m_old, levels=LEVELS, **kw)
    train(m_old, o_first, 3)
    sd = o_first.state_dict()
    for i, p in enumerate(m_old.parameters()):  # as the older version stored it: u = factor · direction
        sd["state"][i][KEPT] = o_first.hypergrad_direction(p) / sd["state"][i]["hypergrad_dir_scale"]
    o_old = cls(m_old, levels=LEVELS, **kw)
    o_old.load_state_dict(torch_roundtrip(sd))
    assert all(KEPT in o_old.state[p] for p in m_old.parameters())
    train(m_old, o_old, 3, start=3)
    assert not any(KEPT in o_old.state[p] for p in m_old.parameters())
    for a, b in zip(m_old.parameters(), m_ref.parameters()):
        assert rel_err(a, b) <= 1e-6
    for lv in LEVELS:
        assert rel_err(o_old.alpha(lv), o_ref.alpha(lv)) <= 1e-6


def test_switching_to_nesterov_keeps_the_direction_from_then_on():
    """Heavy ball rebuilds u from the buffer; after a switch to Nesterov the buffer is no longer the direction: the
    last heavy-ball direction is kept at the switch, and every implementation agrees across it."""
    runs = []
    for impl in (dict(fused=True), dict(foreach=True), dict(foreach=False)):
        model = make_net(dtype=torch.float64)
        opt = CAMHDSGD(model, lr=0.05, momentum=0.9, levels=LEVELS, hypergrad_lr=1e-2, gamma_lr=0.05, **impl)
        train(model, opt, 3, torch.float64)
        u_before = [opt.hypergrad_direction(p) for p in model.parameters()]
        for g in opt.param_groups:
            g["nesterov"] = True
        train(model, opt, 1, torch.float64, start=3)
        assert all(KEPT in opt.state[p] for p in model.parameters())
        train(model, opt, 2, torch.float64, start=4)
        runs.append((model, opt, u_before))
    (m0, o0, u0), *others = runs
    assert all(torch.isfinite(u).all() and u.abs().sum() > 0 for u in u0)
    for m, o, u in others:
        for a, b in zip(m.parameters(), m0.parameters()):
            assert rel_err(a, b) <= 1e-12
        for x, y in zip(u, u0):
            assert rel_err(x, y) <= 1e-12
        for lv in LEVELS:
            assert rel_err(o.alpha(lv, dtype=None), o0.alpha(lv, dtype=None)) <= 1e-12
