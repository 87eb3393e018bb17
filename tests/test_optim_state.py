"""State: checkpoints (spec §5.5), schedulers, param groups, dtypes, frozen / grad-less tensors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD, build_hierarchy

from conftest import batch, make_net, rel_err, torch_roundtrip, train

LEVELS = ("global", "block", "layer", "unit", "parameter")
CONFIGS = {
    "adam": (CAMHDAdam, dict(lr=1e-3, hypergrad_lr=1e-6, hypergrad_rule="additive", gamma_lr=0.05, decay_rate=0.01)),
    "adamw-softmax": (CAMHDAdamW, dict(lr=1e-3, hypergrad_lr=1e-6, hypergrad_rule="additive", gamma_lr=0.05, gamma_update="softmax")),
    "sgdn": (CAMHDSGD, dict(lr=0.05, momentum=0.9, nesterov=True, hypergrad_lr=1e-4, hypergrad_rule="additive", gamma_lr=0.05)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_roundtrip_continues_bitwise(name):
    cls, kw = CONFIGS[name]
    m_full = make_net()
    opt_full = cls(m_full, levels=LEVELS, **kw)
    train(m_full, opt_full, 20)

    m_a = make_net()
    opt_a = cls(m_a, levels=LEVELS, **kw)
    train(m_a, opt_a, 10)
    model_sd, opt_sd = torch_roundtrip(m_a.state_dict()), torch_roundtrip(opt_a.state_dict())
    m_b = make_net(seed=123)  # a fresh model: different init, overwritten by the checkpoint
    m_b.load_state_dict(model_sd)
    opt_b = cls(m_b, levels=LEVELS, **kw)
    opt_b.load_state_dict(opt_sd)
    assert opt_b.num_steps == 10
    train(m_b, opt_b, 10, start=10)
    for a, b in zip(m_full.parameters(), m_b.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt_full.gamma, opt_b.gamma)
    for lv in LEVELS:
        assert torch.equal(opt_full.alpha(lv), opt_b.alpha(lv))


def test_resume_in_a_fresh_process(tmp_path):
    """Save at step k, load in a new Python process, continue to 2k: bitwise equal to one run of 2k steps
    (the uninterrupted run is a process of its own too, so both see the same threads and kernels)."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str((__import__('pathlib').Path(__file__).parent))!r})
        from conftest import make_net, train
        from hf_camhd import CAMHDAdam
        mode, path = sys.argv[1], sys.argv[2]
        kw = dict(levels=("global", "layer", "unit", "parameter"), hypergrad_lr=1e-6, hypergrad_rule="additive", gamma_lr=0.05)
        m = make_net(); opt = CAMHDAdam(m, **kw)
        if mode == "full":
            train(m, opt, 16)
            torch.save(m.state_dict(), path + ".full")
        elif mode == "first":
            train(m, opt, 8)
            torch.save({{"model": m.state_dict(), "opt": opt.state_dict()}}, path)
        else:
            ck = torch.load(path, weights_only=True)
            m.load_state_dict(ck["model"]); opt.load_state_dict(ck["opt"])
            train(m, opt, 8, start=8)
            torch.save(m.state_dict(), path + ".final")
    """)
    ck = str(tmp_path / "ck.pt")
    for mode in ("full", "first", "second"):
        subprocess.run([sys.executable, "-c", script, mode, ck], check=True)
    full = torch.load(ck + ".full", weights_only=True)
    final = torch.load(ck + ".final", weights_only=True)
    for k, v in full.items():
        assert torch.equal(v, final[k]), k


def test_checkpoint_is_plain_data():
    m = make_net()
    opt = CAMHDAdam(m, levels=LEVELS, hypergrad_lr=1e-6, hypergrad_rule="additive")
    train(m, opt, 2)
    sd = opt.state_dict()
    loaded = torch_roundtrip(sd)  # weights_only=True raises on anything but tensors and plain containers
    assert loaded["param_groups"][0]["camhd_tree"]["levels"] == list(LEVELS)
    assert loaded["param_groups"][0]["camhd_step"] == 2


def test_same_seed_same_parameters():
    runs = []
    for _ in range(2):
        m = make_net()
        train(m, CAMHDSGD(m, lr=0.05, momentum=0.9, levels=LEVELS, hypergrad_lr=1e-4, hypergrad_rule="additive", gamma_lr=0.05), 10)
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_scheduler_is_a_multiplier_on_learned_rates():
    """group['lr'] / lr scales the step; the learned α never goes into group['lr']."""
    m1, m2 = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    kw = dict(lr=0.05, levels=("global", "layer"), hypergrad_lr=1e-3)
    o1, o2 = CAMHDSGD(m1, **kw), CAMHDSGD(m2, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(o1, lambda t: 0.5)  # a constant ×0.5 multiplier
    assert o1.param_groups[0]["lr"] == pytest.approx(0.025)
    before = [p.detach().clone() for p in m1.parameters()]
    train(m1, o1, 1, torch.float64)
    train(m2, o2, 1, torch.float64)
    for b, p1, p2 in zip(before, m1.parameters(), m2.parameters()):
        assert rel_err(p1 - b, 0.5 * (p2 - b)) <= 1e-12  # first step: α = lr; the multiplier halves it
    for t in range(1, 6):
        train(m1, o1, 1, torch.float64, start=t)
        sched.step()
    assert o1.param_groups[0]["lr"] == pytest.approx(0.025)   # the scheduler's value, untouched
    assert not torch.allclose(o1.alpha("layer"), torch.full_like(o1.alpha("layer"), 0.05))  # α learned


def test_param_groups_keep_their_settings_and_share_the_tree():
    m = make_net()
    decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in m.named_parameters() if not n.endswith("weight")]
    opt = CAMHDAdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 5e-4}],
                     lr=1e-3, levels=("global", "layer"), hypergrad_lr=1e-6, hypergrad_rule="additive")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.tree.num_nodes("layer") == len(opt.tree.entries)  # plain tensors: one layer per tensor
    train(m, opt, 3)
    assert opt.param_groups[1]["lr"] == 5e-4


def test_named_groups_share_layer_nodes_across_groups():
    """A layer whose weight and bias sit in different groups (the Trainer's decay split) is one node."""
    m = make_net()
    named = list(m.named_parameters())
    groups = [{"params": [(n, p) for n, p in named if n.endswith("weight")], "weight_decay": 0.1},
              {"params": [(n, p) for n, p in named if not n.endswith("weight")], "weight_decay": 0.0}]
    tree = build_hierarchy(m, ("global", "layer", "unit"))
    opt = CAMHDAdamW(groups, lr=1e-3, tree=tree, hypergrad_lr=1e-6, hypergrad_rule="additive")
    assert opt.tree.num_nodes("layer") == tree.num_nodes("layer") == 4
    train(m, opt, 3)
    ref = build_hierarchy(m, ("global", "layer", "unit"))
    assert opt.alpha("unit").numel() == ref.num_nodes("unit")


def test_params_without_grad_are_skipped_and_frozen_params_stay_in_the_tree():
    m = make_net()
    m.features[0].weight.requires_grad_(False)
    opt = CAMHDAdam(m, levels=("global", "layer", "parameter"), hypergrad_lr=1e-4, hypergrad_rule="additive")
    assert "features.0.weight" in opt.tree.param_names  # as torch.optim holds it: unfreezing it trains it
    frozen = m.features[0].weight.detach().clone()
    head_w = m.head.weight
    for t in range(4):
        x, y = batch(t)
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        head_w.grad = None  # this tensor takes no part in the step
        before = head_w.detach().clone()
        opt.step()
        assert torch.equal(head_w, before)
    assert head_w not in opt.state or "exp_avg" not in opt.state[head_w]
    assert opt.num_steps == 4
    assert torch.equal(m.features[0].weight, frozen) and m.features[0].weight not in opt.state


def test_bf16_model_keeps_fp32_hyper_state_across_load():
    m = make_net().to(torch.bfloat16)
    opt = CAMHDAdam(m, levels=LEVELS, hypergrad_lr=1e-6, hypergrad_rule="additive", gamma_lr=0.01)
    train(m, opt, 3, dtype=torch.bfloat16)
    opt2 = CAMHDAdam(m, levels=LEVELS, hypergrad_lr=1e-6, hypergrad_rule="additive", gamma_lr=0.01)
    opt2.load_state_dict(torch_roundtrip(opt.state_dict()))
    for o in (opt, opt2):
        assert o.param_groups[0]["camhd_gamma"].dtype == torch.float32
        for lv in ("global", "block", "layer"):
            assert o.param_groups[0][f"camhd_alpha_{lv}"].dtype == torch.float32
        for p in m.parameters():
            st = o.state[p]
            assert st["exp_avg"].dtype == torch.bfloat16  # base moments follow the parameter, as torch's
            for k in ("hypergrad_dir", "hypergrad_dir_scale", "camhd_alpha_parameter_offset"):
                assert k not in st or st[k].dtype == torch.float32, k
            assert o.hypergrad_direction(p).dtype == torch.float32
            if "camhd_alpha_unit" in st:
                assert st["camhd_alpha_unit"].dtype == torch.float32
    train(m, opt2, 2, dtype=torch.bfloat16, start=3)


def test_loading_a_different_tree_names_the_parameter():
    m = make_net()
    opt = CAMHDAdam(m, levels=("global", "layer"))
    train(m, opt, 1)
    other = make_net()
    other.head = nn.Linear(96, 7)
    opt2 = CAMHDAdam(other, levels=("global", "layer"))
    with pytest.raises(ValueError, match="head.weight"):
        opt2.load_state_dict(opt.state_dict())
    opt3 = CAMHDAdam(make_net(), levels=("global", "layer", "unit"))
    with pytest.raises(ValueError, match="levels differ"):
        opt3.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not saved by a CAM-HD optimizer"):
        opt3.load_state_dict(torch.optim.Adam(make_net().parameters()).state_dict())


def test_lr_stats_are_plain_floats():
    m = make_net()
    opt = CAMHDAdam(m, levels=("global", "layer", "parameter"), hypergrad_lr=1e-6, hypergrad_rule="additive", gamma_lr=0.01)
    train(m, opt, 3)
    stats = opt.lr_stats()
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["camhd/gamma_global"] + stats["camhd/gamma_layer"] + stats["camhd/gamma_parameter"] == \
        pytest.approx(1.0, abs=1e-6)
    assert stats["camhd/alpha_layer_min"] <= stats["camhd/alpha_layer_mean"] <= stats["camhd/alpha_layer_max"]
    assert stats["camhd/effective_lr_mean"] > 0
