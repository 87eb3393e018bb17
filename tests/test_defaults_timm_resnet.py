"""End to end, the way a timm user meets the defaults: ResNet-18 from timm on small images for a few hundred
CPU steps, ``camhdsgdn`` / ``camhdadamw`` at their defaults against timm's own ``sgd`` / ``adamw`` with the
same arguments (lr 0.05 for SGD-N, which diverged with the additive rule's defaults): no worse a loss, no
divergence, and γ learned."""

from __future__ import annotations

import math

import pytest
import timm  # the test extra installs the hf extra, timm included: no skip
import torch
from torch import nn

from hf_camhd.integrations.timm import create_optimizer_v2 as camhd_create

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

STEPS, BATCH, SIZE, CLASSES = 240, 16, 16, 4


def _data(step: int):
    """A learnable image task: each class is a fixed random pattern, seen through noise and random shifts."""
    g = torch.Generator().manual_seed(step)
    patterns = torch.randn(CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    x = patterns[y] + 0.8 * torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    shift = int(torch.randint(-2, 3, (1,), generator=g))
    return torch.roll(x, shift, dims=3), y


def _train(opt_name: str, **kw) -> tuple[list[float], object]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=CLASSES)
    if opt_name.startswith("camhd"):
        opt = camhd_create(model, opt=opt_name, **kw)
    else:
        opt = timm.optim.create_optimizer_v2(model, opt=opt_name, **kw)
    losses = []
    model.train()
    for t in range(STEPS):
        x, y = _data(t)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


@pytest.mark.parametrize("ours,theirs,kw", [
    ("camhdsgdn", "sgd", dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    ("camhdadamw", "adamw", dict(lr=1e-3, weight_decay=0.05)),
], ids=["sgdn", "adamw"])
def test_defaults_train_resnet18_as_well_as_timms_optimizer(ours, theirs, kw):
    base, _ = _train(theirs, **kw)
    mine, opt = _train(ours, **kw)
    assert all(math.isfinite(v) for v in mine), mine[-10:]
    tail = lambda xs: sum(xs[-40:]) / 40  # noqa: E731
    assert tail(base) < 0.5 * base[0]  # the task is learnt by the base optimizer
    assert tail(mine) <= 1.05 * tail(base) + 0.02, (tail(mine), tail(base))
    levels = opt.levels
    assert opt.config.normalized and opt.config.gamma_lr > 0
    moved = float((opt.gamma - 1 / len(levels)).abs().max())
    assert moved > 1e-6, opt.gamma  # γ learned (how far depends on how far the levels' rates drifted apart)
    stats = opt.lr_stats()
    assert stats["camhd/skipped_steps"] == 0 and stats[f"camhd/alpha_{levels[-1]}_max"] < opt.config.alpha_max
