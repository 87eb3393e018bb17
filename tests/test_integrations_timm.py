"""CAM-HD in timm's optimizer factory: create_optimizer_v2(model, opt="camhdadam" | "camhdadamw" | "camhdsgd" | ...)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.optim import create_optimizer_v2  # noqa: E402

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD  # noqa: E402
from hf_camhd.integrations.timm import TIMM_NAMES, register_timm_optimizers  # noqa: E402

register_timm_optimizers()  # what `import hf_camhd` does lazily (see test_import_hf_camhd_registers_...)

CASES = {
    "camhdadam": (CAMHDAdam, {}),
    "camhdadamw": (CAMHDAdamW, {}),
    "camhdsgd": (CAMHDSGD, {"nesterov": False, "momentum": 0.9}),
    "camhdsgdn": (CAMHDSGD, {"nesterov": True, "momentum": 0.9}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=5)


@pytest.mark.parametrize("name", list(CASES))
def test_create_optimizer_v2_builds_camhd_with_the_models_hierarchy(resnet, name):
    cls, group_settings = CASES[name]
    opt = create_optimizer_v2(resnet, opt=name, lr=0.01, weight_decay=1e-4, levels=("global", "block", "layer"),
                              hypergrad_lr=1e-6, gamma_lr=0.01)
    assert type(opt) is cls
    assert opt.levels == ("global", "block", "layer")
    assert opt.tree.node_names("block") == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                           "layer3.1", "layer4.0", "layer4.1", "head"]
    assert opt.config.lr == 0.01 and opt.config.gamma_lr == 0.01
    # timm's own weight-decay split is kept: no decay for biases and norms
    by_decay = {g["weight_decay"]: g for g in opt.param_groups}
    assert set(by_decay) == {0.0, 1e-4}
    assert all(n.endswith(".weight") and "bn" not in n for n in by_decay[1e-4]["param_names"])
    assert any(n.endswith("bn1.bias") for n in by_decay[0.0]["param_names"])
    for k, v in group_settings.items():
        assert all(g[k] == v for g in opt.param_groups), k


def test_timm_model_trains_one_step_and_honours_layer_decay():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    opt = create_optimizer_v2(model, opt="camhdadamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7,
                              levels=("global", "block"))
    assert opt.levels == ("global", "block") and len(opt.param_groups) > 2
    assert all("lr_scale" in g for g in opt.param_groups)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()
    assert opt.num_steps == 2 and torch.isfinite(opt.alpha("block")).all()


def test_plain_params_get_a_flat_tree():
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = create_optimizer_v2([w], opt="camhdadam", lr=1e-3)
    assert isinstance(opt, CAMHDAdam) and opt.tree.num_nodes("layer") == 1


def test_names_are_registered_without_underscores():
    from timm.optim import list_optimizers

    assert set(TIMM_NAMES) <= set(list_optimizers())
    assert all("_" not in n for n in TIMM_NAMES)
    assert register_timm_optimizers()  # idempotent


def test_registration_is_lazy():
    """register_timm_optimizers_lazily() does not import timm; importing timm's optimizer factory later registers."""
    code = textwrap.dedent("""
        import sys
        from hf_camhd.integrations.timm import register_timm_optimizers_lazily
        register_timm_optimizers_lazily()
        assert "timm" not in sys.modules
        import torch
        from timm.optim import create_optimizer_v2
        opt = create_optimizer_v2(torch.nn.Linear(3, 2), opt="camhdsgdn", lr=0.1)
        assert type(opt).__name__ == "CAMHDSGD" and opt.param_groups[0]["nesterov"]
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_import_hf_camhd_registers_the_timm_optimizers():
    """The contract: `import hf_camhd` is enough (hf_camhd/__init__.py calls register_timm_optimizers_lazily),
    whether timm was imported before or after."""
    code = textwrap.dedent("""
        import timm.optim
        import hf_camhd, torch
        from timm.optim import create_optimizer_v2
        assert type(create_optimizer_v2(torch.nn.Linear(3, 2), opt="camhdadam", lr=1e-3)).__name__ == "CAMHDAdam"
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
