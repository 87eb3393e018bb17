"""torch.compile: no graph break inside ``opt.step`` for any tree or base rule, no recompilation while a
scheduler changes a Tensor ``lr``, compiled results equal eager; and the compiled implementation (the
fused path on CUDA: inductor → Triton) run on CPU through inductor's C++ backend equals the dense reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import BASES, batch, make_net, rel_err
from test_optim_reference import assert_matches, run_against_reference

ALL = ("global", "block", "layer", "unit", "parameter")
TREES = [("global",), ("global", "block"), ("global", "layer"), ("global", "layer", "unit"),
         ("global", "layer", "parameter"), ALL]
CASES = [(b, ALL) for b in BASES] + [(b, t) for b in ("adam", "sgd-nesterov") for t in TREES[:-1]]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _optimizer(base: str, levels, model):
    cls, _, kw = BASES[base]
    kw = dict(kw, lr=torch.tensor(kw["lr"], dtype=torch.float64))  # a Tensor lr, as torch recommends for compiled steps
    return cls(model, levels=levels, hypergrad_lr=1e-4, hypergrad_rule="additive", gamma_lr=0.1, decay_rate=0.01, **kw)


def _backward(model, t: int, dtype=torch.float32) -> None:
    x, y = batch(t, dtype)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("base,levels", CASES, ids=[f"{b}-{'+'.join(t)}" for b, t in CASES])
def test_step_has_no_graph_breaks(base, levels):
    model = make_net()
    opt = _optimizer(base, levels, model)
    _backward(model, 0)
    first = torch._dynamo.explain(opt.step)()  # the first step also creates the state
    torch._dynamo.reset()
    _backward(model, 1)
    steady = torch._dynamo.explain(opt.step)()
    for ex in (first, steady):
        assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
        assert ex.graph_count == 1
    assert opt.num_steps == 2


@pytest.mark.parametrize("base", ["adam", "sgd-momentum"])
def test_compiled_step_equals_eager_and_never_recompiles_under_a_schedule(base):
    """100 steps under LambdaLR with a Tensor lr: after the state-creating first step and the first steady
    step, nothing is compiled again; parameters, α and γ equal the eager run's to rounding (float64)."""
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    runs = {}
    for mode in ("eager", "compiled"):
        model = make_net(dtype=torch.float64)
        opt = _optimizer(base, ALL, model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 + 0.5 * 0.97 ** t)
        step = torch.compile(opt.step, backend=counting_backend) if mode == "compiled" else opt.step
        for t in range(100):
            _backward(model, t, torch.float64)
            step()
            sched.step()
            if mode == "compiled" and t == 1:
                after_warmup = len(compiles)
        runs[mode] = (model, opt)
    assert after_warmup == len(compiles) == 2  # the state-creating step and the steady step: no recompilation
    (m_e, o_e), (m_c, o_c) = runs["eager"], runs["compiled"]
    assert isinstance(o_c.param_groups[0]["lr"], torch.Tensor)
    for a, b in zip(m_e.parameters(), m_c.parameters()):
        assert rel_err(b, a) <= 1e-10
    assert rel_err(o_c.param_groups[0]["camhd_gamma"], o_e.param_groups[0]["camhd_gamma"]) <= 1e-10
    for lv in ALL:
        assert rel_err(o_c.alpha(lv, dtype=None), o_e.alpha(lv, dtype=None)) <= 1e-10
    assert not torch.equal(o_c.gamma, torch.full((5,), 0.2))


def test_compiled_implementation_matches_the_dense_reference():
    """The implementation CUDA runs by default (the multi-tensor step compiled by inductor, fullgraph) run on
    CPU in float64: it equals the independent reference like every other implementation."""
    opt, params, ref = run_against_reference("adamw", ALL, dict(foreach=True), steps=6,
                                             _force="compiled")
    from hf_camhd.optim import _functional

    assert opt._last_path == "compiled" and _functional._compile_failure is None  # compiled, no eager fallback
    assert_matches(opt, params, ref)
