"""The torch.optim contract that frameworks rely on, as tables over CAMHDSGD / CAMHDAdam / CAMHDAdamW × trees
(in the manner of torch's own ``test/test_optim.py`` with ``OptimizerInfo``): copying and pickling, adding
param groups, unfreezing, loading state dicts of earlier versions, Tensor ``lr``, closures, ``maximize``,
hooks, ``zero_grad`` and dtypes."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD

from conftest import batch, make_net, rel_err, torch_roundtrip, train

OPTIMIZERS = {
    "sgdn": (CAMHDSGD, dict(lr=0.05, momentum=0.9, nesterov=True, hypergrad_lr=1e-4, hypergrad_rule="additive"), torch.optim.SGD),
    "adam": (CAMHDAdam, dict(lr=1e-3, weight_decay=1e-3, hypergrad_lr=1e-6, hypergrad_rule="additive"), torch.optim.Adam),
    "adamw": (CAMHDAdamW, dict(lr=1e-3, weight_decay=1e-2, hypergrad_lr=1e-6, hypergrad_rule="additive"), torch.optim.AdamW),
}
TREES = [("global",), ("global", "block", "layer"), ("global", "layer", "unit", "parameter")]
CASES = [(o, t) for o in OPTIMIZERS for t in TREES]
IDS = [f"{o}-{'+'.join(t)}" for o, t in CASES]


def _make(name, levels, model=None, **extra):
    cls, kw, _ = OPTIMIZERS[name]
    model = model if model is not None else make_net()
    return model, cls(model, levels=levels, gamma_lr=0.05, decay_rate=0.01, **kw, **extra)


def _same(m1, o1, m2, o2, exact=True):
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b) if exact else rel_err(a, b) <= 1e-6
    assert torch.equal(o1.gamma, o2.gamma)
    for lv in o1.levels:
        assert torch.equal(o1.alpha(lv), o2.alpha(lv)), lv
    assert o1.num_steps == o2.num_steps


# ------------------------------------------------------------------------------ copies
COPIES = {
    "deepcopy": lambda obj: copy.deepcopy(obj),
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
    "torch.save": lambda obj: torch_roundtrip(obj, weights_only=False),
}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name,levels", CASES, ids=IDS)
def test_copies_continue_identically(name, levels, how):
    model, opt = _make(name, levels)
    train(model, opt, 4)
    model2, opt2 = COPIES[how]((model, opt))
    assert type(opt2) is type(opt) and opt2.config == opt.config and opt2.tree == opt.tree
    assert all(p2 is q2 for p2, q2 in zip(opt2.param_groups[0]["params"], model2.parameters()))
    train(model, opt, 4, start=4)
    train(model2, opt2, 4, start=4)
    _same(model, opt, model2, opt2)
    opt2.load_state_dict(opt.state_dict())  # the copy's load hooks are in place


# ------------------------------------------------------------------------------ param groups
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.backbone(x)))


def _train_net(model, opt, steps, start=0):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("named", [True, False], ids=["named", "plain"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_add_param_group_joins_the_tree_and_resumes(name, named):
    cls, kw, _ = OPTIMIZERS[name]
    levels = ("global", "layer", "unit", "parameter") if not named else ("global", "block", "layer", "unit", "parameter")

    def build(model):
        head = list(model.head.named_parameters(prefix="head")) if named else list(model.head.parameters())
        opt = cls(head, levels=levels, gamma_lr=0.05, **kw)
        return opt

    model = _Net()
    opt = build(model)
    _train_net(model, opt, 3)
    backbone_before = [p.detach().clone() for p in model.backbone.parameters()]
    nodes_before = {lv: opt.tree.num_nodes(lv) for lv in levels}
    def backbone(model):  # named like the optimizer's tensors; plain tensors each become their own layer
        return list(model.backbone.named_parameters(prefix="backbone")) if named else list(model.backbone.parameters())

    opt.add_param_group({"params": backbone(model), "lr": kw["lr"] * 0.5})
    assert len(opt.tree.entries) == 6 and len(opt.param_groups) == 2
    assert opt.tree.num_nodes("layer") == nodes_before["layer"] + (2 if named else 4)  # two linears
    assert opt.tree.num_nodes("unit") == nodes_before["unit"] + (16 if named else 32)  # bias paired when named
    assert opt.tree.num_nodes("parameter") == nodes_before["parameter"] + sum(
        p.numel() for p in model.backbone.parameters())
    if named:
        assert opt.tree.num_nodes("block") == nodes_before["block"] + 1
        assert opt.tree.node_names("block")[-1] == "param_group1"
        assert "backbone.0.weight" in opt.tree.param_names
    _train_net(model, opt, 3, start=3)
    assert all(not torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
    assert not torch.equal(opt.alpha("layer")[-1:], torch.full((1,), float(kw["lr"])))  # the new layers learn
    # a checkpoint taken after add_param_group resumes into an optimizer that adds the same group
    sd, msd = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _train_net(model, opt, 3, start=6)
    model2 = _Net()
    model2.load_state_dict(msd)
    opt2 = build(model2)
    opt2.add_param_group({"params": backbone(model2), "lr": kw["lr"] * 0.5})
    opt2.load_state_dict(sd)
    _train_net(model2, opt2, 3, start=6)
    _same(model, opt, model2, opt2)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradual_unfreezing_trains_tensors_frozen_at_construction(name):
    """Train the head, unfreeze the backbone, train all: tensors frozen at construction stay in the tree
    and are trained once unfrozen; β keeps every level at the global level's scale over what is trainable."""
    model = _Net()
    model.backbone.requires_grad_(False)
    cls, kw, _ = OPTIMIZERS[name]
    opt = cls(model, levels=("global", "block", "layer"), gamma_lr=0.05, **kw)
    assert len(opt.tree.entries) == 6
    beta = opt.config.hypergrad_lr
    head_n = sum(p.numel() for p in model.head.parameters())
    layer_beta = opt._tree_index(opt._flat_params()).beta["layer"]
    assert layer_beta[opt.tree.layer_names.index("head")] == pytest.approx(beta * head_n / head_n)
    backbone_before = [p.detach().clone() for p in model.backbone.parameters()]
    _train_net(model, opt, 4)
    assert all(torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
    model.backbone.requires_grad_(True)
    _train_net(model, opt, 4, start=4)
    assert all(not torch.equal(a, b) for a, b in zip(backbone_before, model.backbone.parameters()))
    total = sum(p.numel() for p in model.parameters())
    assert opt._tree_index(opt._flat_params()).beta["layer"][opt.tree.layer_names.index("head")] == pytest.approx(beta * total / head_n)
    backbone_layers = [opt.tree.layer_names.index(n) for n in ("backbone.0", "backbone.2")]
    assert not torch.equal(opt.alpha("layer")[backbone_layers], torch.full((2,), float(kw["lr"])))


# ------------------------------------------------------------------------------ loading older state dicts
def test_state_dict_missing_later_flags_and_with_float_steps_loads():
    """A state dict of an earlier version: no ``maximize`` / ``amsgrad`` in the groups, Python-float ``step``
    entries (older torch), an int step counter: it loads with the defaults and continues identically."""
    model, opt = _make("adam", ("global", "layer", "unit"))
    train(model, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    for g in sd["param_groups"]:
        del g["maximize"], g["amsgrad"]
    for st in sd["state"].values():
        st["step"] = float(st["step"])
    sd["param_groups"][0]["camhd_step"] = int(sd["param_groups"][0]["camhd_step"])
    del sd["param_groups"][0]["camhd_skipped_steps"]
    model2 = copy.deepcopy(model)
    _, opt2 = _make("adam", ("global", "layer", "unit"), model=model2)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["maximize"] is False and opt2.param_groups[0]["amsgrad"] is False
    assert all(isinstance(st["step"], torch.Tensor) for st in opt2.state.values())
    assert opt2.num_steps == 3 and opt2.skipped_steps == 0
    train(model, opt, 3, start=3)
    train(model2, opt2, 3, start=3)
    _same(model, opt, model2, opt2)


# ------------------------------------------------------------------------------ Tensor lr, closure, maximize
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_tensor_lr_reproduces_torch_with_a_scheduler(name):
    cls, kw, ref_cls = OPTIMIZERS[name]
    kw = {k: v for k, v in kw.items() if k not in ("hypergrad_lr", "hypergrad_rule")}
    m1, m2 = make_net(dtype=torch.float64), make_net(dtype=torch.float64)
    lr = torch.tensor(kw.pop("lr"), dtype=torch.float64)
    opt = cls(m1, lr=lr.clone(), levels=("global", "layer"), hypergrad_lr=0.0, gamma_lr=0.0, **kw)
    ref = ref_cls(m2.parameters(), lr=lr.clone(), foreach=False, **kw)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: 0.9 ** t) for o in (opt, ref)]
    for t in range(10):
        for m, o, s in ((m1, opt, scheds[0]), (m2, ref, scheds[1])):
            train(m, o, 1, torch.float64, start=t)
            s.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(float(lr) * 0.9 ** 10)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert rel_err(a, b) <= 1e-12


def test_closure_is_called_once_and_its_loss_returned():
    model, opt = _make("adam", ("global", "layer"))
    calls = []

    def closure():
        calls.append(1)
        x, y = batch(0)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and isinstance(loss, torch.Tensor) and loss.requires_grad is False or loss.ndim == 0
    assert opt.num_steps == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_maximize_is_minimising_the_negated_objective(name):
    m1, m2 = make_net(), make_net()
    _, o1 = _make(name, ("global", "layer", "unit"), model=m1, maximize=True)
    _, o2 = _make(name, ("global", "layer", "unit"), model=m2)
    for t in range(6):
        x, y = batch(t)
        for m, o, sign in ((m1, o1, -1.0), (m2, o2, 1.0)):
            o.zero_grad()
            (sign * nn.functional.cross_entropy(m(x), y)).backward()
            o.step()
    _same(m1, o1, m2, o2)


# ------------------------------------------------------------------------------ hooks, zero_grad
def test_step_and_state_dict_hooks_run():
    model, opt = _make("sgdn", ("global", "layer"))
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o.num_steps)))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o.num_steps)))
    opt.register_state_dict_pre_hook(lambda o: seen.append(("sd", 0)))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("load", o.num_steps)))
    train(model, opt, 2)
    opt.load_state_dict(opt.state_dict())
    assert seen == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2), ("sd", 0), ("load", 2)]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    model, opt = _make("adam", ("global", "layer", "parameter"))
    train(model, opt, 2)
    opt.zero_grad(set_to_none=set_to_none)
    grads = [p.grad for p in model.parameters()]
    assert all(g is None for g in grads) if set_to_none else all(torch.count_nonzero(g) == 0 for g in grads)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()  # zero gradients (or none) — no error; Adam's moments still move the parameters when present
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert moved is (not set_to_none)


# ------------------------------------------------------------------------------ dtypes
DTYPES = {
    "float64": [torch.float64, torch.float64],
    "float32": [torch.float32, torch.float32],
    "bfloat16": [torch.bfloat16, torch.bfloat16],
    "float32+float64": [torch.float32, torch.float64],
    "float32+bfloat16": [torch.float32, torch.bfloat16],
}


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_dtypes_and_mixed_dtype_groups(name, dtypes):
    """Each group in its own dtype: the step reproduces torch.optim (β = δ = 0) per group, and the
    hyper-state is fp32 (float64 when a parameter is float64) whatever the parameter dtype."""
    cls, kw, ref_cls = OPTIMIZERS[name]
    kw = {k: v for k, v in kw.items() if k not in ("hypergrad_lr", "hypergrad_rule")}
    d1, d2 = DTYPES[dtypes]

    def model():
        torch.manual_seed(0)
        return nn.ModuleDict({"a": nn.Linear(4, 6).to(d1), "b": nn.Linear(6, 2).to(d2)})

    def loss_of(m, t):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(8, 4, generator=g)
        return m["b"](torch.tanh(m["a"](x.to(d1))).to(d2)).float().pow(2).mean()

    m1, m2 = model(), model()
    groups = lambda m: [{"params": list(m["a"].parameters())}, {"params": list(m["b"].parameters())}]  # noqa: E731
    opt = cls(groups(m1), levels=("global", "layer", "parameter"), hypergrad_lr=0.0, gamma_lr=0.0, **kw)
    ref = ref_cls(groups(m2), foreach=False, **kw)
    for t in range(8):
        for m, o in ((m1, opt), (m2, ref)):
            o.zero_grad()
            loss_of(m, t).backward()
            o.step()
    tol = 5e-2 if torch.bfloat16 in (d1, d2) else 1e-6  # bf16: a few units of its 8-bit mantissa
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert a.dtype == b.dtype and rel_err(a, b) <= tol
    home = torch.float64 if torch.float64 in (d1, d2) else torch.float32
    assert opt.param_groups[0]["camhd_gamma"].dtype == home
    for p in m1.parameters():
        st = opt.state[p]
        assert opt.hypergrad_direction(p).dtype == (torch.float64 if p.dtype == torch.float64 else torch.float32)
        assert st["camhd_alpha_parameter_offset"].dtype == opt.hypergrad_direction(p).dtype
    # adapting too: finite, and α moves
    opt2 = cls(groups(m1), levels=("global", "layer", "parameter"), hypergrad_lr=1e-4, hypergrad_rule="additive", gamma_lr=0.05, **kw)
    for t in range(8):
        opt2.zero_grad()
        loss_of(m1, t).backward()
        opt2.step()
    assert all(torch.isfinite(p).all() for p in m1.parameters())
    assert math.isfinite(opt2.lr_stats()["camhd/effective_lr_mean"])
