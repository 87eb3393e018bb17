"""The fused CPU kernels (hf_camhd.optim._fused): the same maths as the reference, chosen by default where
they apply, a clear error where ``fused=True`` cannot be honoured, and a silent fallback without a compiler."""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD
from hf_camhd.optim import _fused

from conftest import BASES, make_net, rel_err, train

NO_UNIT = ("global", "block", "layer", "parameter")
ALL = ("global", "block", "layer", "unit", "parameter")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the tensors moved by the kernel that moves θ (pass B, which takes a list of tensors: one count per tensor
    and step when the fused path ran) without changing what it does."""
    calls = {"n": 0}
    real = _fused.apply_many

    def spy(*args, **kwargs):
        calls["n"] += len(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(_fused, "apply_many", spy)
    return calls


def _groups(model, lr):
    named = list(model.named_parameters())
    return [{"params": [(n, p) for n, p in named if n.startswith("features.")], "lr": 2 * lr},
            {"params": [(n, p) for n, p in named if not n.startswith("features.")], "lr": lr}]


def _compare_state(opts, models, levels, tol):
    assert rel_err(opts[0].param_groups[0]["camhd_gamma"], opts[1].param_groups[0]["camhd_gamma"]) <= tol
    for lv in levels:
        assert rel_err(opts[0].alpha(lv, dtype=None), opts[1].alpha(lv, dtype=None)) <= tol, lv
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert rel_err(p, q) <= tol
        s0, s1 = opts[0].state[p], opts[1].state[q]
        assert rel_err(opts[0].hypergrad_direction(p), opts[1].hypergrad_direction(q)) <= tol
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
            assert (k in s0) == (k in s1), k
            if k in s0:
                assert rel_err(s0[k], s1[k]) <= tol, k


@pytest.mark.parametrize("levels", [("global",), ("global", "layer"), ("global", "unit"), NO_UNIT, ALL],
                         ids=lambda lv: "+".join(lv))
def test_fused_equals_reference_on_params_and_state(base, levels, fused_calls):
    """float64, adapting (β, δ, decay τ), two param groups and a scheduler: fused = reference to 1e-12."""
    cls, _, kw = BASES[base]
    models = [make_net(dtype=torch.float64), make_net(dtype=torch.float64)]
    opts = [cls(_groups(m, kw["lr"]), levels=levels, hypergrad_lr=1e-4, gamma_lr=0.1 if len(levels) > 1 else 0.0,
                decay_rate=0.01, hypergrad_rule="additive", **flag, **kw)
            for m, flag in zip(models, (dict(fused=True), dict(foreach=False)))]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.97 ** t) for o in opts]
    for m, o, s in zip(models, opts, scheds):
        for t in range(20):
            train(m, o, 1, torch.float64, start=t)
            s.step()
    assert fused_calls["n"] == 20 * len(list(models[0].parameters()))  # every step, one call per tensor
    _compare_state(opts, models, levels, 1e-12)
    if len(levels) > 1:
        assert not torch.equal(opts[0].gamma, torch.full((len(levels),), 1 / len(levels)))  # γ adapted


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("maximize", [False, True])
def test_fused_adam_options(amsgrad, maximize):
    models = [make_net(dtype=torch.float64), make_net(dtype=torch.float64)]
    opts = [CAMHDAdam(m, lr=1e-3, weight_decay=1e-2, amsgrad=amsgrad, maximize=maximize, levels=ALL,
                      hypergrad_lr=1e-4, hypergrad_rule="additive", gamma_lr=0.05, **flag)
            for m, flag in zip(models, (dict(fused=True), dict(foreach=False)))]
    for m, o in zip(models, opts):
        train(m, o, 15, torch.float64)
    _compare_state(opts, models, ALL, 1e-12)


class _Wide(nn.Module):
    """Tensors above the kernels' 64 Ki-element chunk: one tensor's work is shared by several OpenMP threads."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Linear(64, 1200), nn.Tanh(), nn.Linear(1200, 100)).to(dtype)
        self.head = nn.Linear(100, 10).to(dtype)

    def forward(self, x):
        return self.head(self.features(x))


def _train_wide(model, opt, steps, dtype):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g, dtype=dtype)
        y = torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cls,kw", [(CAMHDAdamW, dict(lr=1e-3, weight_decay=0.1)),
                                    (CAMHDSGD, dict(lr=0.05, momentum=0.9, nesterov=True))], ids=["adamw", "sgd"])
def test_fused_multithreaded_matches_reference_and_is_deterministic(cls, kw):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        models = [_Wide(torch.float64), _Wide(torch.float64)]
        opts = [cls(m, levels=ALL, hypergrad_lr=1e-5, hypergrad_rule="additive", gamma_lr=0.05, **flag, **kw)
                for m, flag in zip(models, (dict(fused=True), dict(foreach=False)))]
        for m, o in zip(models, opts):
            _train_wide(m, o, 8, torch.float64)
        _compare_state(opts, models, ALL, 1e-12)
        runs = []
        for _ in range(2):  # float32, same thread count: bitwise the same run to run
            m = _Wide(torch.float32)
            _train_wide(m, cls(m, levels=ALL, hypergrad_lr=1e-5, hypergrad_rule="additive", gamma_lr=0.05, fused=True, **kw), 8,
                        torch.float32)
            runs.append([p.detach().clone() for p in m.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("levels", [("global", "layer"), ("global", "layer", "unit"), NO_UNIT],
                         ids=["passes-A-B", "passes-A-B-unit", "passes-1-2"])
@pytest.mark.parametrize("cls,kw", [(CAMHDAdam, dict(lr=1e-3)), (CAMHDSGD, dict(lr=0.05, momentum=0.9))],
                         ids=["adam", "sgd"])
def test_fused_results_do_not_depend_on_the_thread_count(cls, kw, levels):
    """The kernels' sums are taken per chunk and added in chunk order: 1 and 2 threads give bitwise the same
    node sums, parameters, γ and α. The gradients are fixed (no backward pass, whose own reductions may depend on the thread
    count); the kernels share torch's OpenMP runtime, so ``torch.set_num_threads`` sets their thread count too."""
    n = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            m = _Wide(torch.float64)  # float64 hyper-state: a last-bit difference in a sum would show
            opt = cls(m, levels=levels, fused=True, gamma_lr=0.05, **kw)
            g = torch.Generator().manual_seed(1)
            for _ in range(6):
                for p in m.parameters():
                    p.grad = 1e-2 * torch.randn(p.shape, generator=g, dtype=torch.float64)
                opt.step()
            assert opt._last_path == "fused_cpu"
            sums = opt._last_hyper["sums"]  # this step's node sums: a different order of addition shows here first
            runs.append([p.detach().clone() for p in m.parameters()] + [sums["global"], sums["layer"], opt.gamma,
                                                                       opt.alpha(levels[-1]), opt.alpha("layer")])
    finally:
        torch.set_num_threads(n)
    assert not torch.equal(runs[0][-1], torch.full_like(runs[0][-1], kw["lr"]))  # the rates were learned
    assert runs[0][-5].abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("rule", [dict(hypergrad_rule="additive", hypergrad_lr=1e-4),
                                  dict(hypergrad_rule="normalized", hypergrad_lr=0.05, gamma_update="softmax")],
                         ids=["additive", "normalized-softmax"])
def test_fused_float32_agrees_with_foreach(base, rule):
    """float32 hyper-state: the C hyper-update between the fused passes rounds as the torch ops of the foreach path
    (sums of many terms aside), so the two stay within 1e-5 after 30 steps."""
    cls, _, kw = BASES[base]
    models = [make_net(), make_net()]
    opts = [cls(m, levels=ALL, gamma_lr=0.1, **rule, **flag, **kw)
            for m, flag in zip(models, (dict(fused=True), dict(foreach=True)))]
    for m, o in zip(models, opts):
        train(m, o, 30)
    _compare_state(opts, models, ALL, 1e-5)


class _ColumnUnits(nn.Module):
    """A GPT-2-style Conv1D: weight stored [in, out], so its units run along dim 1."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.proj = Conv1D(6, 4)

    def forward(self, x):
        return self.proj(x)


def test_default_path_is_fused_where_it_applies(fused_calls):
    m = make_net()
    train(m, CAMHDAdam(m, levels=ALL, hypergrad_lr=1e-6, hypergrad_rule="additive"), 2)
    n = 2 * len(list(m.parameters()))
    assert fused_calls["n"] == n
    for kw in (dict(foreach=True), dict(foreach=False)):  # an explicit foreach choice is honoured
        m = make_net()
        train(m, CAMHDAdam(m, hypergrad_lr=1e-6, hypergrad_rule="additive", **kw), 2)
        assert fused_calls["n"] == n, kw
    m = make_net().to(torch.bfloat16)
    opt = CAMHDAdam(m, levels=("global", "parameter"), hypergrad_lr=1e-6, hypergrad_rule="additive")
    train(m, opt, 2, torch.bfloat16)  # bf16 parameters: foreach, with fp32 hyper-state
    assert fused_calls["n"] == n and torch.isfinite(opt.alpha("parameter")).all()
    assert opt._last_path == "multi_tensor"
    m = _ColumnUnits()
    opt = CAMHDAdam(m, levels=("global", "unit"), hypergrad_lr=1e-6, hypergrad_rule="additive")
    for _ in range(2):  # units along dim 1: foreach
        m(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert fused_calls["n"] == n and opt._last_path == "multi_tensor"


@pytest.mark.parametrize("case,match", [
    ("unit-dim", "'proj.weight' has its units along dim 1"),
    ("bf16", r"dtype torch\.bfloat16"),
    ("noncontiguous", r"its gradient is not stored like the parameter \(torch.contiguous_format\)"),
    ("hyper-state", r"α of level 'layer' is a torch.float32 non-contiguous tensor on cpu \(the fused hyper-update takes "
                    r"contiguous CPU tensors"),
])
def test_fused_true_names_why_a_step_cannot_be_fused(case, match):
    if case == "unit-dim":
        m, levels, x = _ColumnUnits(), ("global", "unit"), torch.randn(3, 4)
    else:
        m, levels, x = make_net(), ("global", "layer"), torch.randn(2, 1, 8, 8)
    if case == "bf16":
        m, x = m.to(torch.bfloat16), x.to(torch.bfloat16)
    opt = CAMHDAdam(m, levels=levels, fused=True)
    m(x).sum().backward()
    if case == "noncontiguous":
        w = m.head.weight
        w.grad = w.grad.t().contiguous().t()
    if case == "hyper-state":  # the C hyper-update reads α through its data pointer
        alpha = opt.param_groups[0]["camhd_alpha_layer"]
        opt.param_groups[0]["camhd_alpha_layer"] = torch.stack([alpha, alpha], 1)[:, 0]
    with pytest.raises(RuntimeError, match=rf"CAMHDAdam\(fused=True\) cannot fuse this step: .*{match}.*fused=None"):
        opt.step()


def test_channels_last_weights_take_the_fused_path(fused_calls):
    """Conv weights stored channels-last (and their grads / state alike) are fused too: dim 0 stays outermost."""
    models = [make_net(dtype=torch.float64).to(memory_format=torch.channels_last) for _ in range(2)]
    conv = models[0].features[3].weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    opts = [CAMHDAdamW(m, lr=1e-2, weight_decay=0.1, levels=ALL, hypergrad_lr=1e-4, hypergrad_rule="additive", gamma_lr=0.1, **flag)
            for m, flag in zip(models, (dict(fused=True), dict(foreach=False)))]
    for m, o in zip(models, opts):
        train(m, o, 10, torch.float64)
    assert fused_calls["n"] == 10 * len(list(models[0].parameters()))
    assert opts[0].state[conv]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    _compare_state(opts, models, ALL, 1e-12)


def test_fused_and_foreach_both_true_is_an_error():
    with pytest.raises(ValueError, match="Invalid fused: True together with foreach=True; pick one"):
        CAMHDSGD(make_net(), foreach=True, fused=True)
    with pytest.raises(ValueError, match=r"Invalid fused: 'yes'"):
        CAMHDSGD(make_net(), fused="yes")


def test_without_a_compiler_the_default_falls_back_to_foreach(monkeypatch, recwarn):
    monkeypatch.setattr(_fused, "_loaded", True)
    monkeypatch.setattr(_fused, "_lib", None)
    monkeypatch.setattr(_fused, "_reason", "no C compiler found (set $CC, or install gcc / clang)")
    monkeypatch.setattr(_fused, "_warned", False)
    runs = []
    for kw in (dict(), dict(foreach=True), dict(fused=False)):
        m = make_net()
        train(m, CAMHDAdam(m, levels=("global", "layer", "parameter"), hypergrad_lr=1e-6, hypergrad_rule="additive", gamma_lr=0.1, **kw), 5)
        runs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for r in runs[1:] for a, b in zip(runs[0], r))  # the fallback is the foreach path
    # said once per process, by the default path only, with the fix
    messages = [str(w.message) for w in recwarn if "fused CPU kernels are unavailable" in str(w.message)]
    assert len(messages) == 1 and "no C compiler found" in messages[0] and "fused=False" in messages[0]
    m = make_net()
    opt = CAMHDAdam(m, fused=True)
    m(torch.randn(2, 1, 8, 8)).sum().backward()
    with pytest.raises(RuntimeError, match=r"fused kernels are unavailable \(no C compiler found"):
        opt.step()


def test_kernels_compile_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_CAMHD_CACHE", str(tmp_path))
    for _ in range(2):
        monkeypatch.setattr(_fused, "_loaded", False)
        monkeypatch.setattr(_fused, "_lib", None)
        assert _fused.load() is not None, _fused.unavailable_reason()
    built = list(tmp_path.iterdir())  # one library, no objects or temporary files left behind
    assert [p.name.startswith("camhd_fused-") and p.suffix == ".so" for p in built] == [True]
    blocked = tmp_path / "a-file"  # a cache path that cannot be created: the per-user temporary folder is used
    blocked.write_text("")
    monkeypatch.setenv("HF_CAMHD_CACHE", str(blocked / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    fallback = _fused._writable_dirs()[1]
    fallback.mkdir(parents=True)
    shutil.copy(built[0], fallback / built[0].name)  # found there: no second build
    monkeypatch.setattr(_fused, "_loaded", False)
    monkeypatch.setattr(_fused, "_lib", None)
    assert _fused.load() is not None, _fused.unavailable_reason()
    assert _fused._lib._name == str(fallback / built[0].name)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(_fused, "_loaded", False)
    monkeypatch.setattr(_fused, "_lib", None)
    monkeypatch.setenv("HF_CAMHD_CACHE", str(tmp_path / "other"))
    assert _fused.load() is None and "no-such-compiler" in _fused.unavailable_reason()


def test_bench_kernels_script_times_every_pass(capsys, monkeypatch):
    """scripts/bench_kernels.py runs (tiny sizes here) and reports every pass next to torch's fused Adam."""
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--tensors", "3", "--numel", "5000", "--rounds", "1"])
    runpy.run_path("scripts/bench_kernels.py", run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "GB/s" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "torch Adam(fused=True) step", "torch foreach copy_ (1 read, 1 write)", "torch vecdot (2 reads)",
        "torch sum (1 read)", "pass A, Adam, global+layer", "pass B, Adam", "pass A, Adam, +parameter",
        "pass B, Adam, +parameter"]
    assert all(float(r.split(" | ")[-1].rstrip(" |")) > 0 for r in rows)
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--tensors", "2", "--numel", "100", "--rounds", "1",
                                      "--threads", "1"])
    try:
        runpy.run_path("scripts/bench_kernels.py", run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    assert ", 1 threads, 2 float32 tensors of 100 elements" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--threads", "0"])
    with pytest.raises(SystemExit, match="--threads 0: give a positive number"):
        runpy.run_path("scripts/bench_kernels.py", run_name="__main__")
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--overhead"])
    runpy.run_path("scripts/bench_kernels.py", run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and " ms " not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == ["torch Adam(fused=True)", "CAMHDAdam global+layer"]
