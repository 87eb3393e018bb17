"""CAM-HD under ``accelerate``: fp32 / bf16 / fp16 (GradScaler), accumulation, clipping, save_state / load_state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDSGD
from hf_camhd.integrations import unwrap_camhd
from hf_camhd.integrations.accelerate import camhd_stats, check_accelerator, log_camhd_stats

from conftest import make_net

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

LEVELS = ("global", "block", "layer", "unit", "parameter")
# CAMHDAdam rebuilds the previous direction from its moments: no hypergrad_dir in its state
HYPER = ("hypergrad_dir_scale", "camhd_alpha_unit", "camhd_alpha_parameter_offset")


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


def _batch(t: int, n: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(2000 + t)
    return torch.randn(n, 1, 8, 8, generator=g).to(dtype), torch.randint(0, 5, (n,), generator=g)


def _opt(model, cls=CAMHDAdam, **kw):
    base = dict(lr=1e-3, hypergrad_lr=1e-5, gamma_lr=0.05, hypergrad_rule="additive") if cls is CAMHDAdam else \
        dict(lr=0.05, momentum=0.9, hypergrad_lr=1e-3, gamma_lr=0.05, hypergrad_rule="additive")
    return cls(model, levels=LEVELS, **{**base, **kw})


def _loop(acc, model, opt, start, stop, sched=None, clip=None, hook=None, dtype=torch.float32):
    for t in range(start, stop):
        x, y = _batch(t, dtype=dtype)
        with acc.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        acc.backward(loss)
        if hook is not None:
            hook(t, model)
        if clip is not None:
            acc.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def _snapshot(model, opt) -> dict:
    inner = unwrap_camhd(opt)
    out = {"gamma": inner.gamma, "steps": inner.num_steps}
    out.update({"alpha_" + lv: inner.alpha(lv) for lv in inner.levels})
    out.update({"param_" + n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def _full_state(opt) -> dict:
    """Every tensor of the optimizer (per-param state and group 0's hyper-state), cloned."""
    inner = unwrap_camhd(opt)
    out = {f"g0.{k}": v.clone() for k, v in inner.param_groups[0].items() if torch.is_tensor(v)}
    for i, p in enumerate(inner._flat_params()):
        for k, v in inner.state.get(p, {}).items():
            out[f"{i}.{k}"] = v.clone()
    return out


def _assert_equal(a: dict, b: dict, exact=True, rtol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if not torch.is_tensor(a[k]):
            assert a[k] == b[k], k
        elif exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-9, msg=k)


def test_prepare_fp32_is_the_plain_loop_bitwise():
    m_ref = make_net()
    opt_ref = _opt(m_ref)
    for t in range(6):
        x, y = _batch(t)
        nn.functional.cross_entropy(m_ref(x), y).backward()
        opt_ref.step()
        opt_ref.zero_grad()
    acc = Accelerator(cpu=True)
    m = make_net()
    model, opt = acc.prepare(m, _opt(m))
    _loop(acc, model, opt, 0, 6)
    _assert_equal(_snapshot(model, opt), _snapshot(m_ref, opt_ref))
    stats = camhd_stats(opt)
    assert set(stats) >= {"camhd/gamma_unit", "camhd/alpha_parameter_max", "camhd/effective_lr_mean"}
    assert camhd_stats(torch.optim.SGD(make_net().parameters(), lr=0.1)) == {}


def test_bf16_autocast_with_clipping_trains_and_logs():
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    m = make_net()
    model, opt = acc.prepare(m, _opt(m))
    before = _snapshot(model, opt)
    _loop(acc, model, opt, 0, 5, clip=0.5)
    after = _snapshot(model, opt)
    assert after["steps"] == 5
    assert not torch.equal(after["alpha_layer"], before["alpha_layer"])  # the rates adapted
    assert all(torch.isfinite(v).all() for k, v in after.items() if torch.is_tensor(v))
    stats = log_camhd_stats(acc, opt, step=5)
    assert stats["camhd/gamma_global"] + stats["camhd/gamma_block"] + stats["camhd/gamma_layer"] + \
        stats["camhd/gamma_unit"] + stats["camhd/gamma_parameter"] == pytest.approx(1.0, abs=1e-6)
    check_accelerator(acc)  # not DeepSpeed: no error


def test_bf16_model_keeps_fp32_hyper_state_across_prepare_and_load_state(tmp_path):
    def build():
        m = make_net().to(torch.bfloat16)
        return m, _opt(m)

    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(*build())
    _loop(acc, model, opt, 0, 3, dtype=torch.bfloat16)
    acc.save_state(str(tmp_path / "ck"))
    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(*build())
    acc.load_state(str(tmp_path / "ck"))
    inner = unwrap_camhd(opt)
    seen = set()
    for p in inner._flat_params():
        st = inner.state[p]
        for k in HYPER:
            if k in st:
                assert st[k].dtype == torch.float32, k
                seen.add(k)
        assert "hypergrad_dir" not in st and inner.hypergrad_direction(p).dtype == torch.float32
        assert st["exp_avg"].dtype == torch.bfloat16  # base moments follow the parameter, as in torch.optim
    assert seen == set(HYPER)
    g0 = inner.param_groups[0]
    for k, v in g0.items():
        if torch.is_tensor(v) and k not in ("camhd_step", "camhd_skipped_steps"):  # the hyper-state: fp32
            assert v.dtype == torch.float32, k
    # the counters stay counters: the step on the CPU (read on the host, like torch's), the skips an integer
    assert g0["camhd_step"].device.type == "cpu" and g0["camhd_step"].dtype == torch.float64
    assert g0["camhd_skipped_steps"].dtype == torch.int64
    assert inner.gamma.dtype == torch.float32 and inner.alpha("layer").dtype == torch.float32
    _loop(acc, model, opt, 3, 5, dtype=torch.bfloat16)  # and it keeps training
    assert inner.num_steps == 5


def test_fp16_gradscaler_skips_an_inf_step_without_touching_optimizer_state():
    """fp16 autocast + torch.amp.GradScaler("cpu") through AcceleratedOptimizer's step skipping.

    note: accelerate enables its GradScaler on GPUs only; on CPU the same objects are wired by hand."""
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    acc.native_amp = True
    m = make_net()
    model, opt = acc.prepare(m, _opt(m, CAMHDSGD))
    assert opt.scaler is acc.scaler
    _loop(acc, model, opt, 0, 4)
    assert unwrap_camhd(opt).num_steps == 4 and not opt.step_was_skipped
    state, params = _full_state(opt), {n: p.detach().clone() for n, p in model.named_parameters()}

    def poison(t, model):
        model.features[3].weight.grad[0, 0, 0, 0] = float("inf")

    _loop(acc, model, opt, 4, 5, hook=poison)
    assert opt.step_was_skipped
    _assert_equal(_full_state(opt), state)  # α, γ, step, momentum buffers, u: all untouched
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    _loop(acc, model, opt, 5, 6)
    assert not opt.step_was_skipped and unwrap_camhd(opt).num_steps == 5
    assert not torch.equal(unwrap_camhd(opt).alpha("unit"), state_alpha_unit(state, opt))


def state_alpha_unit(state: dict, opt) -> torch.Tensor:
    inner = unwrap_camhd(opt)
    parts = [state[f"{g.owner}.camhd_alpha_unit"].to(torch.float32) for g in inner.tree.unit_groups]
    return torch.cat(parts)


def _bn_free_net():
    """No BatchNorm: its batch statistics would make 4 micro-batches differ from one batch of 4x."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 5))


def test_accumulation_of_4_is_one_4x_batch():
    steps, micro = 5, 4
    accum = Accelerator(cpu=True, gradient_accumulation_steps=micro)
    m = _bn_free_net()
    model, opt = accum.prepare(m, _opt(m))
    for t in range(steps):
        x, y = _batch(t)
        for k in range(micro):
            with accum.accumulate(model):
                xs, ys = x[4 * k:4 * k + 4], y[4 * k:4 * k + 4]
                accum.backward(nn.functional.cross_entropy(model(xs), ys))
                opt.step()
                opt.zero_grad()
    a = _snapshot(model, opt)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    m = _bn_free_net()
    model, opt = acc.prepare(m, _opt(m))
    _loop(acc, model, opt, 0, steps)
    b = _snapshot(model, opt)
    assert a["steps"] == b["steps"] == steps  # one hyper-step per optimizer step, not per micro-batch
    _assert_equal(a, b, exact=False, rtol=1e-5)


def test_save_state_load_state_resumes_exactly(tmp_path):
    def build(seed):
        m = make_net(seed)
        opt = _opt(m, CAMHDSGD)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return m, opt, sched

    acc = Accelerator(cpu=True)
    model, opt, sched = acc.prepare(*build(0))
    _loop(acc, model, opt, 0, 4, sched=sched)
    acc.save_state(str(tmp_path / "ck"))
    _loop(acc, model, opt, 4, 8, sched=sched)
    full = _snapshot(model, opt)
    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)
    model, opt, sched = acc.prepare(*build(123))  # another init: everything comes from the checkpoint
    acc.load_state(str(tmp_path / "ck"))
    assert unwrap_camhd(opt).num_steps == 4
    _loop(acc, model, opt, 4, 8, sched=sched)
    _assert_equal(_snapshot(model, opt), full)


def test_load_state_with_a_different_tree_is_a_clear_error(tmp_path):
    acc = Accelerator(cpu=True)
    m = make_net()
    model, opt = acc.prepare(m, _opt(m))
    _loop(acc, model, opt, 0, 2)
    acc.save_state(str(tmp_path / "ck"))
    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)
    m = make_net()
    model, opt = acc.prepare(m, CAMHDAdam(m, levels=("global", "layer", "unit")))
    with pytest.raises(ValueError, match="saved learning-rate tree does not match.*levels differ"):
        acc.load_state(str(tmp_path / "ck"))
