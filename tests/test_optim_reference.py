"""Every implementation of the package against the independent dense reference (tests/reference_camhd.py).

float64, adapting at every level (β, δ, decay τ from the first step), two param groups under a scheduler:
parameters, α at every level, γ and the stored derivative u agree to 1e-10 relative after 12 steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import BASES, batch, make_net, rel_err
from reference_camhd import ReferenceCAMHD

TREES = [("global",), ("global", "block"), ("global", "layer", "unit"), ("global", "layer", "parameter"),
         ("global", "block", "layer", "unit", "parameter")]
IMPLS = {"reference": dict(foreach=False), "multi_tensor": dict(foreach=True), "fused_cpu": dict(fused=True)}
REF_BASE = {"sgd": "sgd", "sgd-momentum": "sgd", "sgd-nesterov": "sgd", "adam": "adam", "adamw": "adamw"}


def _groups(model):
    named = list(model.named_parameters())
    return [{"params": [(n, p) for n, p in named if n.startswith("features.")], "lr_factor": 2.0},
            {"params": [(n, p) for n, p in named if not n.startswith("features.")], "lr_factor": 1.0}]


def run_against_reference(base: str, levels, impl_kwargs: dict, steps: int = 12, _force: str | None = None,
                          device: str = "cpu", **extra):
    cls, _, kw = BASES[base]
    kw = {**kw, **extra}
    model = make_net(dtype=torch.float64).to(device)
    groups = _groups(model)
    for g in groups:
        g["lr"] = kw["lr"] * g.pop("lr_factor")
    hyper = dict(levels=levels, hypergrad_lr=kw.pop("hypergrad_lr", 1e-4), gamma_lr=0.1 if len(levels) > 1 else 0.0,
                 decay_rate=0.01, alpha_inf=0.5 * kw["lr"], hypergrad_rule=kw.pop("hypergrad_rule", "additive"),
                 hypergrad_smoothing=kw.pop("hypergrad_smoothing", 0.0))
    opt = cls(groups, **hyper, **impl_kwargs, **kw)
    opt._forced_implementation = _force  # e.g. "compiled" (CUDA's fused path) on CPU
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.95 ** t)
    params = [p for g in opt.param_groups for p in g["params"]]
    ref_kw = {k: v for k, v in kw.items() if k != "lr"}
    ref = ReferenceCAMHD(params, opt.tree, base=REF_BASE[base], lr=kw["lr"], **hyper, **ref_kw)
    for t in range(steps):
        x, y = batch(t, torch.float64)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        scales = [g["lr"] / kw["lr"] for g in opt.param_groups for _ in g["params"]]
        ref.step([p.grad for p in params], scales)
        opt.step()
        sched.step()
    return opt, params, ref


def assert_matches(opt, params, ref, tol=1e-10):
    for name, a, b in zip(opt.tree.param_names, params, ref.tensors(ref.theta)):
        assert rel_err(a, b) <= tol, name
    assert rel_err(opt.param_groups[0]["camhd_gamma"], ref.gamma) <= tol
    for lv in opt.levels:
        assert rel_err(opt.alpha(lv, dtype=torch.float64), ref.alpha[lv]) <= tol, lv
    for p, u in zip(params, ref.tensors(ref.u)):
        assert rel_err(opt.hypergrad_direction(p), u) <= tol


RULES = {"additive": dict(hypergrad_rule="additive"),
         "normalized": dict(hypergrad_rule="normalized", hypergrad_smoothing=0.8, hypergrad_lr=0.05)}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("levels", TREES, ids=lambda lv: "+".join(lv))
def test_every_implementation_matches_the_dense_reference(base, levels, impl, rule):
    opt, params, ref = run_against_reference(base, levels, IMPLS[impl], **RULES[rule])
    assert opt._last_path == impl
    assert_matches(opt, params, ref)
    if len(levels) > 1:
        assert not torch.equal(opt.gamma, torch.full((len(levels),), 1 / len(levels)))  # γ learned
    assert not torch.equal(opt.alpha("global"), torch.full((1,), float(BASES[base][2]["lr"])))  # α learned


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("options", [dict(amsgrad=True, maximize=True), dict(gamma_update="softmax"),
                                     dict(hypergrad_scaling="sum"), dict(RULES["normalized"], gamma_update="softmax",
                                                                         hypergrad_smoothing=0.0)],
                         ids=["amsgrad-maximize", "softmax", "sum", "normalized-softmax-unsmoothed"])
def test_options_match_the_dense_reference(options, impl):
    opt, params, ref = run_against_reference("adam", ("global", "layer", "unit", "parameter"), IMPLS[impl], **options)
    assert_matches(opt, params, ref)


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("impl", ["reference", "multi_tensor"])
@pytest.mark.parametrize("levels", [("global",), ("global", "block", "layer", "unit", "parameter")],
                         ids=lambda lv: "+".join(lv))
def test_schedule_free_base_matches_the_dense_reference(levels, impl, rule):
    """CAM-HD over Schedule-Free AdamW (one group: the averaging weights follow its lr), in train mode."""
    from hf_camhd import CAMHDScheduleFreeAdamW

    model = make_net(dtype=torch.float64)
    kw = dict(lr=1e-2, weight_decay=1e-2, warmup_steps=4)
    hyper = dict(levels=levels, hypergrad_lr=RULES[rule].get("hypergrad_lr", 1e-4),
                 gamma_lr=0.1 if len(levels) > 1 else 0.0, decay_rate=0.01, alpha_inf=5e-3,
                 hypergrad_rule=rule, hypergrad_smoothing=RULES[rule].get("hypergrad_smoothing", 0.0))
    opt = CAMHDScheduleFreeAdamW(model, **kw, **hyper, **IMPLS[impl])
    params = [p for g in opt.param_groups for p in g["params"]]
    ref = ReferenceCAMHD(params, opt.tree, base="sfadamw", lr=kw["lr"], weight_decay=kw["weight_decay"],
                         warmup_steps=kw["warmup_steps"], **hyper)
    opt.train()
    for t in range(12):
        x, y = batch(t, torch.float64)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        ref.step([p.grad for p in params])
        opt.step()
    assert opt._last_path == impl
    assert_matches(opt, params, ref)
