"""Device behaviour: the default (fused) implementation against the dense reference, bf16 parameters, the
fp16 GradScaler's skipped steps, resume, and — on CUDA — no host synchronisation inside a step.

Every test runs on the CPU and, marked ``cuda``, on a CUDA GPU whenever one is present (on CUDA the default
implementation is the step compiled by ``torch.compile``: inductor → Triton). ``scripts/gpu_check.sh`` runs
the CUDA half and the GPU benchmark; ``python tests/test_cuda.py`` runs the CUDA half without pytest.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD

from conftest import batch, make_net, rel_err, torch_roundtrip
from test_optim_reference import assert_matches, run_against_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DEFAULT_PATH = {"cpu": "fused_cpu", "cuda": "compiled"}
ALL = ("global", "block", "layer", "unit", "parameter")


def _train(model, opt, steps, device, dtype=torch.float32, start=0):
    for t in range(start, start + steps):
        x, y = batch(t, dtype)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("base", ["adamw", "sgd-nesterov"])
def test_default_implementation_matches_the_dense_reference(device, base):
    opt, params, ref = run_against_reference(base, ALL, {}, steps=6, device=device)
    assert opt._last_path == DEFAULT_PATH[device]
    assert_matches(opt, params, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [CAMHDAdamW, CAMHDSGD], ids=["adamw", "sgd"])
def test_bf16_parameters_keep_fp32_hyper_state(device, cls):
    kw = dict(lr=1e-3) if cls is CAMHDAdamW else dict(lr=0.05, momentum=0.9)
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_net().to(device=device, dtype=dtype)
        opt = cls(model, levels=ALL, hypergrad_lr=1e-5, hypergrad_rule="additive", gamma_lr=0.05, **kw)
        _train(model, opt, 8, device, dtype)
        runs[dtype] = (model, opt)
    model, opt = runs[torch.bfloat16]
    assert opt.param_groups[0]["camhd_gamma"].dtype == torch.float32
    for p in model.parameters():
        st = opt.state[p]
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        for k in ("hypergrad_dir", "hypergrad_dir_scale", "camhd_alpha_parameter_offset"):
            assert k not in st or st[k].dtype == torch.float32, k
        assert opt.hypergrad_direction(p).dtype == torch.float32
    flat = lambda m: torch.cat([p.detach().float().reshape(-1) for p in m.parameters()])  # noqa: E731
    assert rel_err(flat(model), flat(runs[torch.float32][0])) <= 2e-2  # bf16 rounding of the same trajectory


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_skips_a_step_with_inf_gradients(device):
    """fp16 GradScaler: on an inf step the optimizer's step() is not called — nothing changes, nothing is
    counted — and the next finite step trains normally."""
    model = make_net().to(device)
    opt = CAMHDAdam(model, levels=("global", "layer", "unit"), hypergrad_lr=1e-5, hypergrad_rule="additive", gamma_lr=0.05)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 10)
    dtype = torch.float16 if device == "cuda" else torch.bfloat16

    def one(t, poison=False):
        x, y = batch(t)
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        scaler.scale(loss).backward()
        if poison:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()

    for t in range(3):
        one(t)
    before = ([p.detach().clone() for p in model.parameters()], opt.gamma, opt.alpha("unit"), opt.num_steps)
    scale = scaler.get_scale()
    one(3, poison=True)
    assert scaler.get_scale() < scale and opt.num_steps == before[3] and opt.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    assert torch.equal(opt.gamma, before[1]) and torch.equal(opt.alpha("unit"), before[2])
    one(4)
    assert opt.num_steps == before[3] + 1 and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_resume_continues_bitwise(device):
    kw = dict(levels=ALL, hypergrad_lr=1e-5, hypergrad_rule="additive", gamma_lr=0.05, decay_rate=0.01)
    model = make_net().to(device)
    opt = CAMHDAdamW(model, **kw)
    _train(model, opt, 4, device)
    model2 = copy.deepcopy(model)
    opt2 = CAMHDAdamW(model2, **kw)
    opt2.load_state_dict(torch_roundtrip(opt.state_dict()))
    assert all(v.device.type == device for st in opt2.state.values() for v in st.values()
               if torch.is_tensor(v) and v.ndim > 0)
    _train(model, opt, 4, device, start=4)
    _train(model2, opt2, 4, device, start=4)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.gamma, opt2.gamma)


@pytest.mark.cuda
@pytest.mark.parametrize("flags", [{}, dict(foreach=True)], ids=["default", "foreach"])
def test_no_host_synchronisation_inside_a_step(flags):
    model = make_net().to("cuda")
    opt = CAMHDAdamW(model, lr=torch.tensor(1e-3), levels=ALL, hypergrad_lr=1e-5, hypergrad_rule="additive", gamma_lr=0.05, **flags)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9 ** t)
    _train(model, opt, 3, "cuda")  # warm-up: state created, step compiled
    x, y = (v.to("cuda") for v in batch(3))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sched.step()
    assert opt.num_steps == 6


if __name__ == "__main__":  # the CUDA half without pytest (a GPU machine with torch but no pytest)
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: torch.cuda.is_available() is False")
    failures = 0
    for fn, params in [(test_default_implementation_matches_the_dense_reference, [("cuda", b) for b in ("adamw", "sgd-nesterov")]),
                       (test_bf16_parameters_keep_fp32_hyper_state, [("cuda", c) for c in (CAMHDAdamW, CAMHDSGD)]),
                       (test_grad_scaler_skips_a_step_with_inf_gradients, [("cuda",)]),
                       (test_resume_continues_bitwise, [("cuda",)]),
                       (test_no_host_synchronisation_inside_a_step, [({},), (dict(foreach=True),)])]:
        for args in params:
            try:
                fn(*args)
                print(f"PASS {fn.__name__}{args}")
            except Exception as err:  # noqa: BLE001 - report every failure, then exit non-zero
                failures += 1
                print(f"FAIL {fn.__name__}{args}: {type(err).__name__}: {err}")
    sys.exit(1 if failures else 0)
