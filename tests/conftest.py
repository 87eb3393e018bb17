"""Shared fixtures and helpers for the optimizer tests."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD

ALL_LEVELS = ("global", "block", "layer", "unit", "parameter")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a CUDA GPU: they run wherever one is present (scripts/gpu_check.sh)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def level_subsets() -> list[tuple[str, ...]]:
    """Every ordered subset of the five levels that starts with global (16 trees)."""
    rest = ALL_LEVELS[1:]
    out = []
    for mask in range(1 << len(rest)):
        out.append(("global",) + tuple(lv for i, lv in enumerate(rest) if mask >> i & 1))
    return out


class SmallConvNet(nn.Module):
    """A small conv net with every kind of tensor: conv + norm, conv with bias, linear.

    note: the conv before the norm has no bias, as in ResNets — a bias there has an exactly-zero true
    gradient (the norm cancels it), so Adam amplifies rounding noise and no reimplementation can match
    torch.optim's trajectory for it beyond float32 rounding.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 6, 3), nn.ReLU())
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def make_net(seed: int = 0, dtype=torch.float32) -> SmallConvNet:
    torch.manual_seed(seed)
    return SmallConvNet().to(dtype)


def batch(step: int, dtype=torch.float32, n: int = 16):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def train(model, opt, steps: int, dtype=torch.float32, start: int = 0, closure_hook=None):
    for t in range(start, start + steps):
        x, y = batch(t, dtype)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if closure_hook is not None:
            closure_hook(t, model)
        opt.step()
    return model


# (CAM-HD class, torch counterpart, shared keyword arguments)
BASES = {
    "sgd": (CAMHDSGD, torch.optim.SGD, dict(lr=0.05)),
    "sgd-momentum": (CAMHDSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "sgd-nesterov": (CAMHDSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (CAMHDAdam, torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-3)),
    "adamw": (CAMHDAdamW, torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and avoids OpenMP spin-waiting on a busy 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_accelerate_state():
    """Each test builds its own Accelerator (accelerate's state is a process-wide singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(params=list(BASES))
def base(request):
    return request.param


def torch_roundtrip(obj, *, weights_only: bool = True):
    """``obj`` through ``torch.save`` / ``torch.load`` in memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=weights_only)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
