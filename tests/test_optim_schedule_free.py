"""CAM-HD over a Schedule-Free base: ``CAMHDScheduleFreeAdamW`` is ``schedulefree.AdamWScheduleFree`` when nothing
adapts, needs its train() / eval() switch, and checkpoints like the other optimizers."""

from __future__ import annotations

import pytest
import schedulefree
import torch
from torch import nn

from hf_camhd import CAMHDScheduleFreeAdamW, create_optimizer

from conftest import batch, make_net, rel_err, torch_roundtrip

IMPLS = {"reference": dict(foreach=False), "multi_tensor": dict(foreach=True), "default": {}}


def _train(model, opt, steps, start=0, dtype=torch.float64):
    for t in range(start, start + steps):
        x, y = batch(t, dtype)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("levels", [("global",), ("global", "block", "layer", "unit", "parameter")],
                         ids=lambda lv: "+".join(lv))
def test_without_adaptation_it_is_schedulefree_adamw(levels, impl):
    kw = dict(lr=1e-2, weight_decay=1e-2, warmup_steps=5, betas=(0.9, 0.99))
    m1, m2 = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    ours = CAMHDScheduleFreeAdamW(m1, levels=levels, hypergrad_lr=0.0, gamma_lr=0.0, **kw, **IMPLS[impl])
    ref = schedulefree.AdamWScheduleFree(m2.parameters(), foreach=False, **kw)
    for opt in (ours, ref):
        opt.train()
    for m, o in ((m1, ours), (m2, ref)):
        _train(m, o, 20)
    for opt in (ours, ref):
        opt.eval()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert rel_err(a, b) <= 1e-12
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert rel_err(ours.state[p]["z"], ref.state[q]["z"]) <= 1e-12


def test_step_outside_train_mode_names_the_fix():
    model = make_net()
    opt = CAMHDScheduleFreeAdamW(model)
    with pytest.raises(RuntimeError, match=r"not in train mode\. Call optimizer\.train\(\) before training and "
                                           r"optimizer\.eval\(\) before every evaluation and checkpoint"):
        _train(model, opt, 1, dtype=torch.float32)
    opt.train()
    _train(model, opt, 2, dtype=torch.float32)
    opt.eval()
    with pytest.raises(RuntimeError, match="not in train mode"):
        _train(model, opt, 1, dtype=torch.float32)


def test_eval_holds_the_average_and_train_restores_the_training_point():
    model = make_net(dtype=torch.float64)
    opt = CAMHDScheduleFreeAdamW(model, lr=1e-2, levels=("global", "layer"))
    opt.train()
    _train(model, opt, 8)
    y = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    beta1 = opt.param_groups[0]["betas"][0]
    for p, yy in zip(model.parameters(), y):
        z = opt.state[p]["z"]
        assert rel_err(p, (yy - (1 - beta1) * z) / beta1) <= 1e-12  # x, from y = (1 − β1) z + β1 x
        assert not torch.equal(p, yy)
    opt.train()
    for p, yy in zip(model.parameters(), y):
        assert rel_err(p, yy) <= 1e-12


def test_checkpoint_in_eval_mode_resumes_identically():
    """The Schedule-Free way: eval() before saving, train() after loading; the continuation is bitwise."""
    kw = dict(lr=1e-2, levels=("global", "layer", "unit"), gamma_lr=0.05)
    model = make_net(dtype=torch.float64)
    opt = CAMHDScheduleFreeAdamW(model, **kw)
    opt.train()
    _train(model, opt, 6)
    opt.eval()
    msd, osd = torch_roundtrip(model.state_dict()), torch_roundtrip(opt.state_dict())
    model2 = make_net(seed=3, dtype=torch.float64)
    model2.load_state_dict(msd)
    opt2 = CAMHDScheduleFreeAdamW(model2, **kw)
    opt2.load_state_dict(osd)
    assert opt2.param_groups[0]["train_mode"] is False
    for m, o in ((model, opt), (model2, opt2)):
        o.train()
        _train(m, o, 6, start=6)
        o.eval()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.gamma, opt2.gamma)


def test_registry_name_builds_it():
    opt = create_optimizer(make_net(), "sfadamw-camhd", lr=1e-3)
    assert isinstance(opt, CAMHDScheduleFreeAdamW) and opt.config.normalized
