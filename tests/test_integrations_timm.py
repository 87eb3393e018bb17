"""CAM-HD in timm's optimizer registry: create_optimizer_v2(model, opt="camhdadam" | ..., tree=...), the
hf_camhd wrapper that builds the tree, and timm's own train.py through hf_camhd.integrations.timm_train."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.optim import create_optimizer_v2 as timm_create_optimizer_v2  # noqa: E402

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD, build_hierarchy  # noqa: E402
from hf_camhd.hierarchy import LRTree  # noqa: E402
from hf_camhd.integrations.timm import TIMM_NAMES, create_optimizer_v2, register_timm_optimizers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LEVELS = ("global", "block", "layer")
RESNET_BLOCKS = ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
                 "layer4.1", "head"]
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


def _check_timm_groups(opt, cls, group_settings):
    assert type(opt) is cls
    assert opt.levels == LEVELS and opt.tree.node_names("block") == RESNET_BLOCKS
    # timm's own weight-decay split is kept: no decay for biases and norms
    by_decay = {g["weight_decay"]: g for g in opt.param_groups}
    assert set(by_decay) == {0.0, 1e-4}
    assert all(n.endswith(".weight") and "bn" not in n for n in by_decay[1e-4]["param_names"])
    assert any(n.endswith("bn1.bias") for n in by_decay[0.0]["param_names"])
    for k, v in group_settings.items():
        assert all(g[k] == v for g in opt.param_groups), k


@pytest.mark.parametrize("name", list(CASES))
def test_timm_factory_with_tree_builds_the_models_block_tree(resnet, name):
    cls, group_settings = CASES[name]
    opt = timm_create_optimizer_v2(resnet, opt=name, lr=0.01, weight_decay=1e-4, tree=build_hierarchy(resnet, LEVELS),
                                   hypergrad_lr=1e-6, hypergrad_rule="additive", gamma_lr=0.01)
    _check_timm_groups(opt, cls, group_settings)
    assert opt.config.lr == 0.01 and opt.config.gamma_lr == 0.01


@pytest.mark.parametrize("name", list(CASES))
def test_hf_camhd_create_optimizer_v2_builds_the_tree_from_levels(resnet, name):
    cls, group_settings = CASES[name]
    opt = create_optimizer_v2(resnet, name, lr=0.01, weight_decay=1e-4, levels=LEVELS)
    _check_timm_groups(opt, cls, group_settings)
    # the default levels, and a comma-separated string
    assert create_optimizer_v2(resnet, name, lr=0.01).levels == LEVELS
    assert create_optimizer_v2(resnet, name, lr=0.01, levels="global,block").levels == ("global", "block")


def test_other_names_go_to_timm_unchanged(resnet):
    opt = create_optimizer_v2(resnet, "adamw", lr=1e-3, weight_decay=0.05)
    assert type(opt) is torch.optim.AdamW and {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    with pytest.raises(ValueError, match=r"Invalid arguments for opt='adamw': levels= and tree= are CAM-HD settings"):
        create_optimizer_v2(resnet, "adamw", lr=1e-3, levels=LEVELS)


def test_param_group_fn_with_named_groups_and_a_tree(resnet):
    def named_groups(model):  # any param_group_fn that names its tensors
        params = list(model.named_parameters())
        return [{"params": [(n, p) for n, p in params if p.ndim > 1]},
                {"params": [(n, p) for n, p in params if p.ndim <= 1], "weight_decay": 0.0}]

    tree = build_hierarchy(resnet, LEVELS)
    opt = timm_create_optimizer_v2(resnet, opt="camhdadam", lr=1e-3, weight_decay=0.1, param_group_fn=named_groups,
                                   tree=tree)
    assert sorted(opt.tree.node_names("block")) == sorted(RESNET_BLOCKS) and opt.tree.num_nodes("layer") == 41
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    # a param_group_fn may also return the tree itself (one group, the optimizer's own defaults)
    opt = timm_create_optimizer_v2(resnet, opt="camhdadam", lr=1e-3, param_group_fn=lambda m: build_hierarchy(m, LEVELS))
    assert opt.tree.node_names("block") == RESNET_BLOCKS and len(opt.param_groups) == 1


def test_layer_decay_groups_train_with_the_block_tree():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    opt = timm_create_optimizer_v2(model, opt="camhdadamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7,
                                   tree=build_hierarchy(model, ("global", "block")))
    assert opt.levels == ("global", "block") and opt.tree.num_nodes("block") > 2 and len(opt.param_groups) > 2
    assert all("lr_scale" in g for g in opt.param_groups)
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        opt.zero_grad()
        model(x).logsumexp(1).mean().backward()
        opt.step()
    assert opt.num_steps == 2 and torch.isfinite(opt.alpha("block")).all()


def test_anonymous_groups_get_a_flat_tree_and_a_block_request_says_how_to_pass_the_tree(resnet):
    w = torch.nn.Parameter(torch.randn(3, 4))
    opt = timm_create_optimizer_v2([w], opt="camhdadam", lr=1e-3)
    assert isinstance(opt, CAMHDAdam) and opt.tree.num_nodes("layer") == 1
    with pytest.raises(ValueError, match=re.escape("timm handed over anonymous parameter groups") + ".*"
                       + re.escape("tree=hf_camhd.build_hierarchy(model, levels)")):
        timm_create_optimizer_v2(resnet, opt="camhdadam", lr=1e-3, levels=LEVELS)


def test_a_tree_of_another_model_or_an_unbound_tree_is_refused(resnet):
    other = timm.create_model("resnet18", num_classes=5)
    with pytest.raises(ValueError, match=r"tensor of shape .* is not a parameter of the ResNet the tree was built from"):
        timm_create_optimizer_v2(resnet, opt="camhdadam", lr=1e-3, tree=build_hierarchy(other, LEVELS))
    unbound = LRTree.from_dict(build_hierarchy(resnet, LEVELS).to_dict())
    with pytest.raises(ValueError, match="it is not bound to a live model"):
        timm_create_optimizer_v2(resnet, opt="camhdadam", lr=1e-3, tree=unbound)


def test_names_are_registered_as_timm_records_without_underscores():
    from timm.optim import list_optimizers
    from timm.optim._optim_factory import OptimInfo, default_registry

    assert set(TIMM_NAMES) <= set(list_optimizers())
    assert all("_" not in n for n in TIMM_NAMES)
    assert all(isinstance(default_registry.get_optimizer_info(n), OptimInfo) for n in TIMM_NAMES)
    assert register_timm_optimizers()  # idempotent


def test_no_frame_inspection_anywhere_in_the_package():
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "hf_camhd").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"_getframe|f_back|inspect\.stack", line)]
    assert hits == []


def _run(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def test_import_hf_camhd_registers_the_names_lazily_before_or_after_timm():
    """`import hf_camhd` does not import timm; importing timm's optimizer factory later registers the names, and
    so does importing hf_camhd after timm."""
    after = _run("""
        import sys, torch
        import hf_camhd
        assert "timm" not in sys.modules
        from timm.optim import create_optimizer_v2
        opt = create_optimizer_v2(torch.nn.Linear(3, 2), opt="camhdsgdn", lr=0.1)
        assert type(opt).__name__ == "CAMHDSGD" and opt.param_groups[0]["nesterov"]
    """)
    assert after.returncode == 0, after.stderr
    before = _run("""
        import timm.optim, torch
        import hf_camhd
        from timm.optim import create_optimizer_v2
        assert type(create_optimizer_v2(torch.nn.Linear(3, 2), opt="camhdadam", lr=1e-3)).__name__ == "CAMHDAdam"
    """)
    assert before.returncode == 0, before.stderr


# ------------------------------------------------------------------------------------------ timm's train.py
# note: timm's train.py is not in the timm package (wheel or sdist), and tests download nothing. With
# TIMM_TRAIN_PY=/path/to/train.py (from github.com/huggingface/pytorch-image-models, the version of the installed
# timm) the test runs the real script; otherwise it writes this stand-in, which builds its optimizer exactly as
# train.py does (its --opt / --lr / --weight-decay / --opt-kwargs arguments, `from timm.optim import
# create_optimizer_v2, optimizer_kwargs`, `create_optimizer_v2(model, **optimizer_kwargs(cfg=args),
# **args.opt_kwargs)`) and trains on the ImageFolder with timm's dataset and transforms.
STAND_IN_TRAIN_PY = '''
"""Stand-in for timm's train.py (its optimizer path), written by tests/test_integrations_timm.py."""
import argparse, os
import torch
from timm import utils
from timm.data import create_dataset, create_transform
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs

p = argparse.ArgumentParser()
p.add_argument("--data-dir"); p.add_argument("--model", default="resnet18"); p.add_argument("--num-classes", type=int)
p.add_argument("--img-size", type=int); p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--epochs", type=int, default=1); p.add_argument("--output")
p.add_argument("--opt", default="sgd"); p.add_argument("--lr", type=float, default=None)
p.add_argument("--momentum", type=float, default=0.9); p.add_argument("--weight-decay", type=float, default=2e-5)
p.add_argument("--opt-eps", type=float, default=None); p.add_argument("--opt-betas", type=float, nargs="+")
p.add_argument("--layer-decay", type=float, default=None)
p.add_argument("--opt-kwargs", nargs="*", default={}, action=utils.ParseKwargs)
p.add_argument("--device"); p.add_argument("--workers", type=int); p.add_argument("--warmup-epochs", type=int)
p.add_argument("--no-aug", action="store_true")
args = p.parse_args()
torch.manual_seed(0)
model = create_model(args.model, num_classes=args.num_classes)
optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
print(f"Created {type(optimizer).__name__} ({args.opt}) optimizer")
ds = create_dataset("", root=args.data_dir, split="train", is_training=True,
                    transform=create_transform(args.img_size, is_training=False))
loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True)
for epoch in range(args.epochs):
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
    print(f"epoch {epoch} loss {loss.item():.4f}")
os.makedirs(os.path.join(args.output, "run"), exist_ok=True)
torch.save({"optimizer": optimizer.state_dict(), "epoch": args.epochs}, os.path.join(args.output, "run", "last.pth.tar"))
'''


@pytest.fixture
def image_folder(tmp_path):
    """A two-class ImageFolder (train / validation) of small noisy images."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "data"
    for split in ("train", "validation"):
        for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(6):
                pixels = (torch.tensor(colour).view(1, 1, 3) + torch.randint(-40, 41, (16, 16, 3), generator=g))
                Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()).save(folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_timms_train_py_runs_with_camhdadamw_through_the_launcher(tmp_path, image_folder):
    real = os.environ.get("TIMM_TRAIN_PY")
    script = Path(real) if real else tmp_path / "train.py"
    if not real:
        script.write_text(STAND_IN_TRAIN_PY)
    args = ["--data-dir", str(image_folder), "--num-classes", "2", "--device", "cpu", "--workers", "0",
            "--batch-size", "4", "--img-size", "16", "--model", "resnet18", "--opt", "camhdadamw", "--lr", "1e-3",
            "--weight-decay", "0.05", "--warmup-epochs", "0", "--no-aug", "--epochs", "2",
            "--output", str(tmp_path / "out"), "--opt-kwargs", "levels=global,block,layer"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the README's command: python -m hf_camhd.integrations.timm_train TRAIN_PY ARGS
    done = subprocess.run([sys.executable, "-m", "hf_camhd.integrations.timm_train", str(script), *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Created CAMHDAdamW (camhdadamw) optimizer" in done.stdout + done.stderr
    checkpoint = sorted((tmp_path / "out").glob("*/last.pth.tar"))[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["optimizer"]
    group = state["param_groups"][0]
    tree = LRTree.from_dict(group["camhd_tree"])
    assert tree.levels == LEVELS and tree.node_names("block") == RESNET_BLOCKS
    assert int(group["camhd_step"]) == 6  # 2 epochs x 3 batches of 4 images
    assert {g["weight_decay"] for g in state["param_groups"]} == {0.0, 0.05}  # timm's split, kept
    # without the launcher the name is unknown to train.py
    plain = subprocess.run([sys.executable, str(script), *args[:-2]], capture_output=True, text=True, timeout=600,
                           env=env, cwd=tmp_path)
    assert plain.returncode != 0 and "camhdadamw not found in registry" in plain.stderr


def test_launcher_usage_errors():
    done = subprocess.run([sys.executable, "-m", "hf_camhd.integrations.timm_train", "missing/train.py"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "TRAIN_PY 'missing/train.py' does not exist" in done.stderr
    done = subprocess.run([sys.executable, "-m", "hf_camhd.integrations.timm_train"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "usage: python -m hf_camhd.integrations.timm_train TRAIN_PY" in done.stderr
