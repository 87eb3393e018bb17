"""Bad input everywhere, as tables (torch's ``ErrorOptimizerInput`` style): one row per (entry point, input),
each asserting the error type and the words of its message — the input, the value and, where there is
one, the fix.

Python entry points: :class:`ErrorInput` rows (``call(ctx)`` must raise ``error_type`` matching ``regex``).
Command lines: :class:`CLIError` rows — ``hf-camhd ...`` (``hf_camhd.cli.main``) and the training scripts'
argument parsers must exit with status 2, print no traceback, and end stderr with a line matching ``regex``.
The optimizer rows assert the messages of ``hf_camhd/optim/validation.py`` as they are.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD, build_hierarchy
from hf_camhd._extras import MissingDependencyError
from hf_camhd.cli import main as cli_main
from hf_camhd.data import DatasetUnavailableError
from hf_camhd.hub import HubUploadError

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ErrorInput:
    """``call(ctx)`` raises ``error_type`` with a message ``re.search``-matching ``regex``."""

    id: str
    call: Callable[[object], object]
    error_type: type[BaseException]
    regex: str


@dataclass(frozen=True)
class CLIError:
    """``prog argv`` (``{ws}`` = the test's workspace folder) exits with 2 and its last stderr line matches
    ``regex``; ``prog`` is ``hf-camhd`` or a script of scripts/."""

    id: str
    argv: tuple[str, ...]
    regex: str
    prog: str = "hf-camhd"


class Ctx:
    def __init__(self, ws: Path, monkeypatch):
        self.ws, self.mp = ws, monkeypatch


# ------------------------------------------------------------------------------------------------ workspace
def _idx(path: Path, array: np.ndarray, head: bytes | None = None) -> None:
    header = (head or bytes([0, 0, 8, array.ndim])) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _idx_folder(folder: Path, images=(10, 28, 28), labels=(10,), head=None, label_value=0) -> Path:
    folder.mkdir(parents=True)
    for split in ("train", "t10k"):
        _idx(folder / f"{split}-images-idx3-ubyte", np.zeros(images, np.uint8), head)
        _idx(folder / f"{split}-labels-idx1-ubyte", np.full(labels, label_value, np.uint8))
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("errors")
    (ws / "afile").write_text("not a folder")
    (ws / "empty").mkdir()
    _idx_folder(ws / "idx-magic", head=b"\x01\x02\x08\x03")
    _idx_folder(ws / "idx-type", head=b"\x00\x00\x07\x03")
    _idx_folder(ws / "idx-shape", images=(10, 8, 8))
    _idx_folder(ws / "idx-count", labels=(9,))
    _idx_folder(ws / "idx-labels", label_value=12)
    trunc = _idx_folder(ws / "idx-gz")
    for f in list(trunc.iterdir()):
        data = gzip.compress(f.read_bytes())
        f.unlink()
        (trunc / (f.name + ".gz")).write_bytes(data[: len(data) // 2] if "t10k-images" in f.name else data)
    raw = ws / "raw"
    raw.mkdir()
    _idx(raw / "short", np.zeros((10, 28, 28), np.uint8))
    (raw / "short").write_bytes((raw / "short").read_bytes()[:100])
    (raw / "empty").write_bytes(b"")
    return ws


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _frozen() -> nn.Module:
    return nn.Linear(2, 2).requires_grad_(False)


def _factory(**kw):
    from hf_camhd.integrations.transformers import CAMHDOptimizerFactory

    model = kw.pop("model", None)
    return CAMHDOptimizerFactory()(_mlp() if model is None else model, **kw)


def _hub_model():
    from hf_camhd.models import MLP

    return MLP(input_size=4, hidden_sizes=[3], num_classes=2)


def _publish(ctx, **kw):
    from hf_camhd.hub import publish

    args = dict(results={"accuracy": 0.5}, optimizer={"name": "adam"}, dataset="digits")
    args.update(kw)
    model = args.pop("model", None) or _hub_model()
    return publish(model, ctx.ws / "hub-out", **args)


def _upload(ctx, repo_id="me/x", token="hf_x", offline=False, create_repo=None, folder=None):
    from huggingface_hub import HfApi

    from hf_camhd.hub import upload_folder

    ctx.mp.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", offline)
    ctx.mp.setattr("huggingface_hub.get_token", lambda: None)
    # note: never the real network: every row that gets as far as the Hub finds it unreachable
    ctx.mp.setattr(HfApi, "create_repo", create_repo or _no_network)
    ctx.mp.setattr(HfApi, "upload_folder", _no_network)
    if folder is None:
        folder = ctx.ws / "upload"
        folder.mkdir(exist_ok=True)
    return upload_folder(folder, repo_id, token=token)


def _no_network(self, *args, **kwargs):
    raise ConnectionError("Failed to resolve 'huggingface.co' ([Errno -3] Temporary failure in name resolution)")


def _load(name="fashion_mnist", **kw):
    from hf_camhd.data import load_image_dataset

    return load_image_dataset(name, **kw)


# ------------------------------------------------------------------------------------------------ rows: library
HIERARCHY = [
    ErrorInput("unknown level", lambda c: build_hierarchy(_mlp(), ("global", "layers")), ValueError,
               r"^Unknown level 'layers'; expected one of global, block, layer, unit, parameter$"),
    ErrorInput("unknown level in a string", lambda c: build_hierarchy(_mlp(), "global,blok"), ValueError,
               r"^Unknown level 'blok'; expected one of global, block"),
    ErrorInput("no levels", lambda c: build_hierarchy(_mlp(), ()), ValueError,
               r"^Invalid levels: empty; expected an ordered subset of global, .* starting with 'global'"),
    ErrorInput("global not first", lambda c: build_hierarchy(_mlp(), ("layer", "global")), ValueError,
               r"^Invalid levels \('layer', 'global'\): the first level must be 'global'"),
    ErrorInput("level twice", lambda c: build_hierarchy(_mlp(), ("global", "layer", "layer")), ValueError,
               r"^Invalid levels \('global', 'layer', 'layer'\): a level appears twice"),
    ErrorInput("levels out of order", lambda c: build_hierarchy(_mlp(), ("global", "unit", "layer")), ValueError,
               r"levels must be ordered coarse to fine \(global, block, layer, unit, parameter\)"),
    ErrorInput("levels not a sequence", lambda c: build_hierarchy(_mlp(), 3), ValueError,
               r"^Invalid levels: 3; expected a sequence of level names such as \('global', 'layer'\)"),
    ErrorInput("bad block regex", lambda c: build_hierarchy(_mlp(), ("global", "block"), blocks={"a": ["("]}),
               ValueError, r"^Invalid blocks regex '\(' for block 'a': missing \)"),
    ErrorInput("block regex matching nothing",
               lambda c: build_hierarchy(_mlp(), ("global", "block"), blocks={"a": ["^zzz"]}), ValueError,
               r"^Invalid blocks: regex '\^zzz' of block 'a' matches no trainable parameter"),
    ErrorInput("parameter in two blocks",
               lambda c: build_hierarchy(_mlp(), ("global", "block"), blocks={"a": ["weight"], "b": ["^0"]}),
               ValueError, r"parameter '0\.weight' is matched by block 'a' and by regex '\^0' of block 'b'; each "
                           r"parameter must be in one block"),
    ErrorInput("model with no parameters", lambda c: build_hierarchy(nn.ReLU(), ("global",)), ValueError,
               r"^Invalid params: the model \(ReLU\) has no trainable parameters .*pass a model with parameters"),
    ErrorInput("model with every parameter frozen", lambda c: build_hierarchy(_frozen(), ("global",)), ValueError,
               r"the model \(Linear\) has no trainable parameters \(none, or all frozen with requires_grad=False\)"),
    ErrorInput("not a module", lambda c: build_hierarchy([torch.zeros(2)], ("global",)), ValueError,
               r"^Invalid model: expected an nn\.Module, got list"),
    ErrorInput("unknown builder", lambda c: build_hierarchy(_mlp(), ("global",), builder="nope"), ValueError,
               r"^Unknown builder 'nope'; expected one of .*generic"),
]

FACTORY = [
    ErrorInput("not a model", lambda c: _factory(model="bert"), TypeError,
               r"CAMHDOptimizerFactory needs the model \(an nn\.Module\), got str; pass it as "
               r"optimizer_cls_and_kwargs=\(CAMHDOptimizerFactory, kwargs\)"),
    ErrorInput("unknown optimizer", lambda c: _factory(optimizer="adam-camdh"), ValueError,
               r"^Unknown optimizer 'adam-camdh'; expected one of sgd-camhd, .*adam-camhd"),
    ErrorInput("unknown level", lambda c: _factory(levels=("global", "layr")), ValueError, r"^Unknown level 'layr'"),
    ErrorInput("unknown keyword", lambda c: _factory(nonsense=1), ValueError,
               r"^Invalid CAMHDOptimizerFactory keyword 'nonsense' for 'adam-camhd' \(CAMHDAdam\); expected some of "
               r"optimizer, levels, tree, weight_decay, lr, betas"),
    ErrorInput("weight_decay not a number", lambda c: _factory(weight_decay="0.01"), ValueError,
               r"^Invalid weight_decay: '0\.01'; expected a number >= 0"),
    ErrorInput("negative weight_decay", lambda c: _factory(weight_decay=-1.0), ValueError,
               r"^Invalid weight_decay value: -1\.0 \(must be a finite number ≥ 0\)$"),
    ErrorInput("negative lr", lambda c: _factory(lr=-1.0), ValueError, r"^Invalid learning rate: -1\.0 \(must be a finite number > 0\)$"),
    ErrorInput("frozen model", lambda c: _factory(model=_frozen()), ValueError, r"has no trainable parameters"),
    ErrorInput("gamma of the wrong length", lambda c: _factory(gamma=(1.0,)), ValueError,
               r"^Invalid gamma: must have one weight per level \(3 levels: global, block, layer\), got 1"),
    ErrorInput("a variant's fixed setting", lambda c: _factory(optimizer="sgdn-camhd", nesterov=False), ValueError,
               r"^Invalid nesterov for 'sgdn-camhd': False; this variant fixes nesterov=True \(choose another "
               r"optimizer name"),
    ErrorInput("a tree of another model",
               lambda c: _factory(tree=build_hierarchy(nn.Linear(3, 3), ("global",))), ValueError,
               r"parameters \['0\.weight', '0\.bias', '2\.weight'\] are not in the tree"),
]


def _optimizer_rows() -> list[ErrorInput]:
    """Every public argument of the three optimizers, with the messages of hf_camhd/optim/validation.py."""
    shared = [
        ("negative lr", dict(lr=-1.0), r"^Invalid learning rate: -1\.0 \(must be a finite number > 0\)$"),
        ("string lr", dict(lr="0.1"), r"^Invalid learning rate: '0\.1' \(a str\); expected a float > 0$"),
        ("zero lr", dict(lr=0.0), r"^Invalid learning rate: 0\.0 \(CAM-HD needs lr > 0: .*scale steps to zero with "
                                  r"a scheduler instead\)"),
        ("nan lr", dict(lr=math.nan), r"^Invalid learning rate: nan \(must be a finite number > 0\)$"),
        ("tensor lr of two numbers", dict(lr=torch.tensor([0.1, 0.2])),
         r"^Invalid learning rate: a Tensor lr must hold one real number, got shape \(2,\)"),
        ("bool hypergrad_lr", dict(hypergrad_lr=True), r"^Invalid hypergrad_lr value: True \(a bool\); expected a float ≥ 0$"),
        ("tensor hypergrad_lr", dict(hypergrad_lr=torch.tensor(0.1)),
         r"^Invalid hypergrad_lr: hypergrad_lr must be a Python float, got a Tensor .*pass float\(hypergrad_lr\)$"),
        ("negative hypergrad_lr", dict(hypergrad_lr=-1.0), r"^Invalid hypergrad_lr value: -1\.0 \(must be a finite number ≥ 0\)$"),
        ("negative gamma_lr", dict(gamma_lr=-1.0), r"^Invalid gamma_lr value: -1\.0 \(must be a finite number ≥ 0\)$"),
        ("negative decay_rate", dict(decay_rate=-1.0), r"^Invalid decay_rate value: -1\.0 \(must be a finite number ≥ 0\)$"),
        ("negative alpha_inf", dict(alpha_inf=-1.0), r"^Invalid alpha_inf value: -1\.0 \(must be a finite number ≥ 0\)$"),
        ("negative weight_decay", dict(weight_decay=-1.0), r"^Invalid weight_decay value: -1\.0 \(must be a finite number ≥ 0\)$"),
        ("unknown hypergrad_scaling", dict(hypergrad_scaling="mean"),
         r"^Invalid hypergrad_scaling: 'mean'; expected one of 'equal', 'sum'$"),
        ("unknown gamma_update", dict(gamma_update="exp"), r"^Invalid gamma_update: 'exp'; expected one of 'clamp', "
                                                           r"'softmax'$"),
        ("negative alpha_min", dict(alpha_min=-1.0), r"^Invalid alpha_min value: -1\.0 \(must be a finite number ≥ 0\)$"),
        ("alpha_max below lr", dict(lr=0.1, alpha_min=0.01, alpha_max=0.05),
         r"^Invalid alpha_max value: 0\.05 \(below lr=0\.1; the learned rates start at lr\)$"),
        ("alpha_min above lr", dict(lr=0.01, alpha_min=0.05),
         r"^Invalid alpha_min value: 0\.05 \(above lr=0\.01; the learned rates start at lr\)$"),
        ("gamma of the wrong length", dict(levels=("global", "layer"), gamma=(1.0,)),
         r"^Invalid gamma: must have one weight per level \(2 levels: global, layer\), got 1$"),
        ("negative gamma weight", dict(levels=("global", "layer"), gamma=(1.0, -1.0)),
         r"^Invalid gamma: weight 1 \(level 'layer'\) is -1\.0; weights must be finite and ≥ 0$"),
        ("gamma summing to 0", dict(levels=("global", "layer"), gamma=(0.0, 0.0)),
         r"^Invalid gamma: \[0\.0, 0\.0\] sums to 0; at least one weight must be > 0$"),
        ("zero gamma with softmax", dict(levels=("global", "layer"), gamma=(1.0, 0.0), gamma_update="softmax"),
         r"^Invalid gamma: weight 1 \(level 'layer'\) is 0, but gamma_update='softmax' needs every weight > 0"),
        ("unknown level", dict(levels=("global", "layr")), r"^Unknown level 'layr'; expected one of global, block"),
        ("foreach not a bool", dict(foreach="yes"), r"^Invalid foreach: 'yes'; expected True, False or None$"),
        ("fused not a bool", dict(fused=1), r"^Invalid fused: 1; expected True, False or None$"),
        ("foreach and fused", dict(foreach=True, fused=True),
         r"^Invalid fused: True together with foreach=True; pick one"),
        ("no parameters", dict(params=[]), r"^Invalid params: empty parameter list; pass a model, "
                                           r"model\.named_parameters\(\) or an iterable of tensors"),
        ("tree not a tree", dict(tree="x"), r"^Invalid tree: expected an LRTree, e\.g\. "
                                            r"tree=hf_camhd\.build_hierarchy\(model, levels\), got str$"),
        ("gamma as a string", dict(levels=("global", "layer"), gamma="0.5,x"),
         r"^Invalid gamma: '0\.5,x'; expected one number per level, e\.g\. \(0\.5, 0\.5\) or '0\.5,0\.5'$"),
        ("maximize not a bool", dict(maximize="yes"), r"^Invalid maximize: 'yes'; expected True or False$"),
    ]
    per_class = {
        CAMHDSGD: [
            ("negative momentum", dict(momentum=-0.1), r"^Invalid momentum value: -0\.1 \(must be a finite number ≥ 0\)$"),
            ("negative dampening", dict(dampening=-0.1), r"^Invalid dampening value: -0\.1 \(must be a finite number ≥ 0\)$"),
            ("nesterov not a bool", dict(momentum=0.9, nesterov="yes"), r"^Invalid nesterov: 'yes'; expected True or False$"),
            ("nesterov without momentum", dict(nesterov=True),
             r"^Invalid nesterov: Nesterov momentum requires a momentum and zero dampening \(got momentum=0\.0, "
             r"dampening=0\.0\)$"),
        ],
        CAMHDAdam: [], CAMHDAdamW: [],
    }
    for cls in (CAMHDAdam, CAMHDAdamW):
        per_class[cls] += [
            ("beta1 of 1", dict(betas=(1.0, 0.9)), r"^Invalid beta parameter at index 0: 1\.0 \(each beta must be in "
                                                   r"\[0, 1\)\)$"),
            ("negative beta2", dict(betas=(0.9, -0.1)), r"^Invalid beta parameter at index 1: -0\.1 \(each beta must be "
                                                        r"in \[0, 1\)\)$"),
            ("amsgrad not a bool", dict(amsgrad="yes"), r"^Invalid amsgrad: 'yes'; expected True or False$"),
            ("one beta", dict(betas=(0.9,)), r"^Invalid betas: expected a pair \(beta1, beta2\), got \(0\.9,\)$"),
            ("negative eps", dict(eps=-1.0), r"^Invalid epsilon value: -1\.0 \(must be a float ≥ 0\)$"),
        ]

    def make(cls, kw):
        kw = dict(kw)
        params = kw.pop("params", None)
        return lambda c: cls(_mlp() if params is None else params, **kw)

    rows = [ErrorInput(f"{cls.__name__}: {name}", make(cls, kw), ValueError, regex)
            for cls, own in per_class.items() for name, kw, regex in shared + own]
    return rows + [ErrorInput(f"{cls.__name__}: params None", lambda c, cls=cls: cls(None), TypeError,
                              r"^params argument given to the optimizer should be an nn\.Module or an iterable of "
                              r"Tensors or dicts, but got None$") for cls in per_class]


DATA = [
    ErrorInput("unknown dataset", lambda c: _load("imagenet"), ValueError,
               r"^Unknown dataset 'imagenet'; expected one of digits, mnist, fashion_mnist, cifar10, svhn$"),
    ErrorInput("unknown split", lambda c: _load("digits", split="val"), ValueError,
               r"^Invalid split: 'val'; expected one of train, test or None for both$"),
    ErrorInput("max_samples 0", lambda c: _load("digits", max_samples=0), ValueError,
               r"^Invalid max_samples: must be a positive int or None, got 0$"),
    ErrorInput("missing folder", lambda c: _load(data_dir=c.ws / "missing"), DatasetUnavailableError,
               r"data_dir '.*missing' does not exist or is not a folder\. Pass data_dir= pointing to a save_to_disk "
               r"folder, .*without data_dir, fashion_mnist comes from apt-get install dataset-fashion-mnist"),
    ErrorInput("folder without data", lambda c: _load(data_dir=c.ws / "empty"), DatasetUnavailableError,
               r"data_dir '.*empty' holds none of a save_to_disk folder, train/test parquet files, or MNIST-style IDX "
               r"files with the split\(s\) train, test\. Without data_dir"),
    ErrorInput("wrong IDX magic", lambda c: _load(data_dir=c.ws / "idx-magic"), ValueError,
               r"^Invalid IDX file '.*idx-magic/t(rain|10k)-images-idx3-ubyte': bad magic number 01020803 .*not an "
               r"MNIST-style IDX file: replace it"),
    ErrorInput("unknown IDX type code", lambda c: _load(data_dir=c.ws / "idx-type"), ValueError,
               r"^Invalid IDX file '.*idx-type/.*': unknown type code 0x07 \(expected one of 0x08, .*download the file "
               r"again"),
    ErrorInput("IDX images of the wrong shape", lambda c: _load(data_dir=c.ws / "idx-shape"), ValueError,
               r"IDX files t(rain|10k)-images-idx3-ubyte / .* in '.*idx-shape' do not hold fashion_mnist: Images of "
               r"shape \(10, 1, 8, 8\) .*expected \(N, 28, 28\).*point data_dir at the fashion_mnist files"),
    ErrorInput("IDX images and labels disagree", lambda c: _load(data_dir=c.ws / "idx-count"), ValueError,
               r"IDX files of split '(train|test)' in '.*idx-count' disagree: 10 images, 9 labels; the images and "
               r"labels files must come from the same split"),
    ErrorInput("IDX labels out of range", lambda c: _load(data_dir=c.ws / "idx-labels"), ValueError,
               r"in '.*idx-labels' do not hold fashion_mnist: labels must lie in \[0, 10\), got 12\.\.12; point "
               r"data_dir at"),
    ErrorInput("truncated gzip IDX", lambda c: _load(data_dir=c.ws / "idx-gz"), ValueError,
               r"Invalid IDX file '.*t10k-images-idx3-ubyte\.gz': its gzip stream is truncated or corrupted "
               r"\(EOFError: .*\); download the file again"),
    ErrorInput("truncated IDX", lambda c: __import__("hf_camhd.data", fromlist=["read_idx"]).read_idx(c.ws / "raw" /
                                                                                                      "short"),
               ValueError, r"header declares shape \(10, 28, 28\) \(7840 bytes of uint8\) but 84 bytes follow "
                           r"\(truncated or damaged\); download the file again"),
    ErrorInput("empty IDX", lambda c: __import__("hf_camhd.data", fromlist=["read_idx"]).read_idx(c.ws / "raw" / "empty"),
               ValueError, r"^Invalid IDX file '.*empty': bad magic number \(empty\)"),
    ErrorInput("Hub dataset with the Hub off", lambda c: _load("cifar10", use_hub=False), DatasetUnavailableError,
               r"^Dataset 'cifar10' is not available\. Tried: the Hub dataset 'uoft-cs/cifar10' \(skipped: "
               r"use_hub=False\)\. Get it with: .*or pass data_dir="),
    ErrorInput("images of the wrong shape",
               lambda c: __import__("hf_camhd.data", fromlist=["x"]).to_pixel_values(
                   np.zeros((3, 5, 5)), __import__("hf_camhd.data", fromlist=["x"]).dataset_info("digits")),
               ValueError, r"^Images of shape \(3, 1, 5, 5\) do not fit dataset 'digits': expected \(N, 8, 8\)"),
    ErrorInput("tensors of different lengths",
               lambda c: __import__("hf_camhd.data", fromlist=["x"]).TensorImageDataset(torch.zeros(3, 1, 8, 8),
                                                                                         torch.zeros(2)),
               ValueError, r"^pixel_values and labels disagree on the number of examples: 3 vs 2$"),
]

def _without(c, module: str, call: Callable[[], object]) -> object:
    """``call()`` as if ``module`` were not installed."""
    c.mp.setitem(sys.modules, module, None)
    return call()


def _compare(c, **kw) -> object:
    from hf_camhd.experiments import CompareConfig, run_comparison

    return run_comparison(CompareConfig(**{"epochs": 1, "seeds": 1, "progress": False, "plots": False,
                                           "output_dir": str(c.ws / "compare-out"), **kw}), log=None)


COMPARE_API = [
    ErrorInput("a baseline whose package is missing",
               lambda c: _without(c, "dadaptation", lambda: __import__("hf_camhd.baselines", fromlist=["x"])
                                  .create_baseline("dadapt-adam", [nn.Parameter(torch.zeros(2))])),
               MissingDependencyError, r"^the dadapt-adam baseline needs dadaptation, which is not installed: pip "
                                       r"install 'hf_camhd\[experiments\]'$"),
    ErrorInput("a comparison arm whose package is missing",
               lambda c: _without(c, "dog", lambda: _compare(c, optimizers=("adam", "dog"))), MissingDependencyError,
               r"^the dog arm of hf-camhd compare needs dog, which is not installed: pip install "
               r"'hf_camhd\[experiments\]'$"),
    ErrorInput("a Schedule-Free arm without the run's length",
               lambda c: __import__("hf_camhd.experiments.arms", fromlist=["x"]).build_optimizer(
                   __import__("hf_camhd.experiments.arms", fromlist=["x"]).resolve_arm("schedulefree-adamw"),
                   nn.Linear(2, 2), {"lr": 0.0025, "warmup_fraction": 0.05}),
               ValueError, r"^Invalid total_steps: None; the schedulefree-adamw arm warms up over a fraction of the "
                           r"run, so build_optimizer needs total_steps"),
    ErrorInput("β sweep with a bad base", lambda c: _compare(c, sweep_hypergrad_lr=True, sweep_bases=("rmsprop",)),
               ValueError, r"^Invalid --bases value: 'rmsprop'; expected some of adam, adamw, sgd, sgdn"),
]

PUBLISH = [
    ErrorInput("missing results", lambda c: _publish(c, results=None), ValueError,
               r"^Invalid results: None; publish needs the evaluation results .*such as \{'accuracy': 0\.91\}"),
    ErrorInput("empty results", lambda c: _publish(c, results={}), ValueError, r"^Invalid results: \{\}; publish needs"),
    ErrorInput("a result that is not a number", lambda c: _publish(c, results={"accuracy": "high"}), ValueError,
               r"^Invalid results: metric 'accuracy' is 'high'; every result must be a finite number"),
    ErrorInput("a NaN result", lambda c: _publish(c, results={"loss": math.nan}), ValueError,
               r"^Invalid results: metric 'loss' is nan; every result must be a finite number"),
    ErrorInput("push without repo_id", lambda c: _publish(c, push=True), ValueError,
               r"^Invalid repo_id: push=True needs repo_id='user/name'$"),
    ErrorInput("invalid repo id", lambda c: _publish(c, push=True, repo_id="me/bad id!"), ValueError,
               r"^Invalid repo_id: 'me/bad id!' is not a Hub repository id \(.*\); expected 'user/name' with letters"),
    ErrorInput("repo id with three parts", lambda c: _publish(c, push=True, repo_id="a/b/c"), ValueError,
               r"^Invalid repo_id: 'a/b/c' is not a Hub repository id"),
    ErrorInput("an unsupported model", lambda c: _publish(c, model=nn.Linear(2, 2)), ValueError,
               r"^Invalid model: Linear is not an hf_camhd model, a timm model or a transformers model"),
    ErrorInput("optimizer summary without a name", lambda c: _publish(c, optimizer={"lr": 1}), ValueError,
               r"^Invalid optimizer summary: a mapping needs at least a 'name' key"),
    ErrorInput("dataset without a name", lambda c: _publish(c, dataset={"id": "x/y"}), ValueError,
               r"^Invalid dataset: a mapping needs a 'name' key"),
    ErrorInput("a plot that does not exist", lambda c: _publish(c, plots={"curves": c.ws / "missing.png"}), ValueError,
               r"^Invalid plots: 'curves' -> '.*missing\.png' is not a file; pass existing PNG paths$"),
    ErrorInput("upload without a token", lambda c: _upload(c, token=None), HubUploadError,
               r"^No Hugging Face token: log in with `hf auth login` or pass token=\.\.\. \. The Hub-ready folder is "
               r"at .*upload it later with `hf upload me/x"),
    ErrorInput("upload with HF_HUB_OFFLINE", lambda c: _upload(c, offline=True), HubUploadError,
               r"^HF_HUB_OFFLINE is set, so nothing was uploaded\. The Hub-ready folder is at"),
    ErrorInput("upload without network", lambda c: _upload(c), HubUploadError,
               r"^Upload to 'me/x' failed \(ConnectionError: Failed to resolve 'huggingface\.co'.*\)\. The Hub-ready "
               r"folder is at .*upload it later"),
    ErrorInput("upload of a missing folder", lambda c: _upload(c, folder=c.ws / "empty" / "nothing"), HubUploadError,
               r"^Folder '.*nothing' does not exist; nothing was uploaded\. Write it with publish\(\) first"),
    ErrorInput("upload to an invalid repo id", lambda c: _upload(c, repo_id="me/x--y"), ValueError,
               r"^Invalid repo_id: 'me/x--y' is not a Hub repository id"),
]

ENTRY_POINTS = {"build_hierarchy": HIERARCHY, "CAMHDOptimizerFactory": FACTORY, "optimizers": _optimizer_rows(),
                "data": DATA, "compare": COMPARE_API, "publish": PUBLISH}
PY_ROWS = [(f"{group}: {row.id}", row) for group, rows in ENTRY_POINTS.items() for row in rows]


@pytest.mark.parametrize("row", [r for _, r in PY_ROWS], ids=[i for i, _ in PY_ROWS])
def test_python_entry_point_errors(row: ErrorInput, workspace, monkeypatch):
    with pytest.raises(row.error_type) as info:
        row.call(Ctx(workspace, monkeypatch))
    assert type(info.value) is row.error_type, type(info.value)
    assert re.search(row.regex, str(info.value)), f"{str(info.value)!r} does not match {row.regex!r}"


# ------------------------------------------------------------------------------------------------ rows: command lines
_C = ("compare", "--epochs", "1", "--max-train-samples", "64", "--no-progress", "--no-plots")
COMPARE = [
    CLIError("unknown task", ("compare", "--task", "nope"),
             r"^hf-camhd: error: Unknown task 'nope'; expected one of mlp-digits, "),
    CLIError("unknown arm", ("compare", "--optimizers", "adam,nope"),
             r"^hf-camhd: error: Unknown optimizer 'nope' for --optimizers; expected one of adam, adamw"),
    CLIError("empty arm list", ("compare", "--optimizers", ","),
             r"^hf-camhd compare: error: argument --optimizers: expected a comma-separated list, got ','$"),
    CLIError("unknown level", ("compare", "--levels", "global,layr"), r"^hf-camhd: error: Unknown level 'layr'; expected"),
    CLIError("global not first", ("compare", "--levels", "layer,global"),
             r"^hf-camhd: error: Invalid levels \('layer', 'global'\): the first level must be 'global'"),
    CLIError("negative seeds", ("compare", "--seeds", "-1"),
             r"^hf-camhd compare: error: argument --seeds: expected a positive integer, got '-1'$"),
    CLIError("zero seeds", ("compare", "--seeds", "0"),
             r"^hf-camhd compare: error: argument --seeds: expected a positive integer, got '0'$"),
    CLIError("negative first seed", ("compare", "--first-seed", "-1"),
             r"^hf-camhd compare: error: argument --first-seed: expected an integer >= 0, got '-1'$"),
    CLIError("zero epochs", ("compare", "--epochs", "0"),
             r"^hf-camhd compare: error: argument --epochs: expected a positive integer, got '0'$"),
    CLIError("batch size not a number", ("compare", "--batch-size", "x"),
             r"^hf-camhd compare: error: argument --batch-size: expected a positive integer, got 'x'$"),
    CLIError("gamma not numbers", ("compare", "--gamma", "a,b"),
             r"^hf-camhd compare: error: argument --gamma: 'a,b': could not convert string to float: 'a'$"),
    CLIError("gamma of the wrong length", (*_C, "--gamma", "1,2,3"),
             r"^hf-camhd: error: Invalid gamma: must have one weight per level \(2 levels: global, layer\), got 3$"),
    CLIError("unknown model", ("compare", "--model", "vgg"),
             r"^hf-camhd compare: error: argument --model: invalid choice: 'vgg' \(choose from .*'lenet5'"),
    CLIError("unknown dataset", ("compare", "--dataset", "imagenet"),
             r"^hf-camhd compare: error: argument --dataset: invalid choice: 'imagenet' \(choose from 'digits'"),
    CLIError("unknown device", ("compare", "--device", "tpu"),
             r"^hf-camhd compare: error: argument --device: invalid choice: 'tpu' \(choose from 'auto', 'cpu', 'cuda'\)"),
    CLIError("sweep value out of range", ("compare", "--sweep-gamma", "--sweep-values", "1.5"),
             r"^hf-camhd: error: Invalid sweep value: 1\.5; γ_global must lie in \[0, 1\]$"),
    CLIError("sweep of a baseline", ("compare", "--sweep-gamma", "--optimizers", "adam"),
             r"^hf-camhd: error: Invalid --optimizers for --sweep-gamma: give one CAM-HD arm"),
    CLIError("sweep over one level", ("compare", "--sweep-gamma", "--levels", "global"),
             r"^hf-camhd: error: Invalid --levels for --sweep-gamma: the sweep needs a two-level tree, got global$"),
    CLIError("push without a repo id", ("compare", "--push-to-hub"),
             r"^hf-camhd: error: Invalid hub_model_id: --push-to-hub needs --hub-model-id user/name$"),
    CLIError("push to an invalid repo id", ("compare", "--push-to-hub", "--hub-model-id", "bad id!!"),
             r"^hf-camhd: error: Invalid --hub-model-id: 'bad id!!' is not a Hub repository id .*expected 'user/name'"),
    CLIError("push of an arm not compared", (*_C, "--push-to-hub", "--hub-model-id", "me/x", "--hub-optimizer", "sgd"),
             r"^hf-camhd: error: Invalid hub_optimizer 'sgd': not among this comparison's optimizers"),
    CLIError("push of a sweep", ("compare", "--sweep-gamma", "--push-to-hub", "--hub-model-id", "me/x"),
             r"^hf-camhd: error: Invalid push_to_hub: publish from a comparison, not from a --sweep-gamma run$"),
    CLIError("push of a β sweep", ("compare", "--sweep-hypergrad-lr", "--push-to-hub", "--hub-model-id", "me/x"),
             r"^hf-camhd: error: Invalid push_to_hub: publish from a comparison, not from a --sweep-hypergrad-lr run$"),
    CLIError("two sweeps at once", ("compare", "--sweep-gamma", "--sweep-hypergrad-lr"),
             r"^hf-camhd: error: Invalid sweep: --sweep-gamma and --sweep-hypergrad-lr are two studies; run them one "
             r"at a time"),
    CLIError("β-sweep flag without the sweep", ("compare", "--rules", "normalized"),
             r"^hf-camhd: error: Invalid --rules: it sets the β sweep; add --sweep-hypergrad-lr \(or drop --rules\)$"),
    CLIError("β sweep of an unknown base", ("compare", "--sweep-hypergrad-lr", "--bases", "adam,lion"),
             r"^hf-camhd: error: Invalid --bases value: 'lion'; expected some of adam, adamw, sgd, sgdn "
             r"\(comma-separated\)$"),
    CLIError("β sweep of an unknown rule", ("compare", "--sweep-hypergrad-lr", "--rules", "multiplicative"),
             r"^hf-camhd: error: Invalid --rules value: 'multiplicative'; expected additive, normalized or both"),
    CLIError("β sweep with β = 0", ("compare", "--sweep-hypergrad-lr", "--betas", "0,1e-3"),
             r"^hf-camhd: error: Invalid --betas value: 0\.0; every β must be a finite number > 0 \(the base "
             r"optimizer, β = 0, is the sweep's reference line already\)$"),
    CLIError("β sweep of the normalized rule with β = 1", ("compare", "--sweep-hypergrad-lr", "--betas", "1e-3,1"),
             r"^hf-camhd: error: Invalid --betas value: 1\.0 for the normalized rule, whose β is the fraction a rate "
             r"may move per step and must be < 1 .*; give values below 1, or sweep β >= 1 with --rules additive only$"),
    CLIError("β sweep with β not numbers", ("compare", "--sweep-hypergrad-lr", "--betas", "1e-3,x"),
             r"^hf-camhd compare: error: argument --betas: '1e-3,x': could not convert string to float: 'x'$"),
    CLIError("β sweep with --optimizers", ("compare", "--sweep-hypergrad-lr", "--optimizers", "adam-camhd"),
             r"^hf-camhd: error: Invalid --optimizers for --sweep-hypergrad-lr: the sweep picks its arms from --bases "
             r"\(adam, adamw, sgd, sgdn\) and --rules \(additive, normalized\); drop --optimizers$"),
    CLIError("output dir that is a file", (*_C, "--output-dir", "{ws}/afile"),
             r"^hf-camhd: error: Invalid output_dir '.*/afile': it is a file; pass --output-dir a folder path"),
    CLIError("output dir inside a file", (*_C, "--output-dir", "{ws}/afile/sub"),
             r"^hf-camhd: error: Invalid output_dir '.*/afile/sub': it is inside '.*/afile', which is a file; pass "
             r"--output-dir a folder path"),
    CLIError("data dir without data", (*_C, "--data-dir", "{ws}/empty", "--output-dir", "{ws}/o1"),
             r"^hf-camhd: error: Dataset 'digits': data_dir '.*/empty' holds none of a save_to_disk folder"),
    CLIError("data dir that does not exist", (*_C, "--data-dir", "{ws}/missing", "--output-dir", "{ws}/o2"),
             r"^hf-camhd: error: Dataset 'digits': data_dir '.*/missing' does not exist or is not a folder"),
    CLIError("data dir with a damaged IDX file", (*_C, "--dataset", "fashion_mnist", "--data-dir", "{ws}/idx-magic",
                                                 "--output-dir", "{ws}/o3"),
             r"^hf-camhd: error: Invalid IDX file '.*idx-magic/.*': bad magic number 01020803"),
    CLIError("unknown flag", ("compare", "--bogus"), r"^hf-camhd: error: unrecognized arguments: --bogus$"),
    CLIError("unknown subcommand", ("bogus",),
             r"^hf-camhd: error: argument \{compare,tree\}: invalid choice: 'bogus' \(choose from 'compare', 'tree'\)$"),
]

TREE = [
    CLIError("unknown model", ("tree", "nope_model"),
             r"^hf-camhd tree: error: Unknown model 'nope_model': expected a timm model name, or one of lenet5, mlp"),
    CLIError("unknown level", ("tree", "mlp", "--levels", "global,layr"), r"^hf-camhd tree: error: Unknown level 'layr'"),
    CLIError("global not first", ("tree", "mlp", "--levels", "layer"),
             r"^hf-camhd tree: error: Invalid levels \('layer',\): the first level must be 'global'"),
    CLIError("nodes of a level not in the tree", ("tree", "mlp", "--nodes", "unit", "--levels", "global,layer"),
             r"^hf-camhd tree: error: --nodes unit: the level is not in --levels global,layer$"),
    CLIError("nodes of an unknown level", ("tree", "mlp", "--nodes", "leaf"),
             r"^hf-camhd tree: error: argument --nodes: invalid choice: 'leaf'"),
    CLIError("unknown builder", ("tree", "mlp", "--builder", "nope"),
             r"^hf-camhd tree: error: Unknown builder 'nope'; expected one of "),
    CLIError("save onto a folder", ("tree", "mlp", "--save", "{ws}/empty"),
             r"^hf-camhd tree: error: --save .*/empty: cannot write the tree there \(Is a directory\); pass a file path"),
    CLIError("save inside a file", ("tree", "mlp", "--save", "{ws}/afile/tree.json"),
             r"^hf-camhd tree: error: --save .*/afile/tree\.json: cannot write the tree there"),
    CLIError("no model", ("tree",), r"^hf-camhd tree: error: the following arguments are required: model$"),
    CLIError("limit not a number", ("tree", "mlp", "--limit", "x"),
             r"^hf-camhd tree: error: argument --limit: invalid int value: 'x'$"),
]

SCRIPTS = [
    CLIError("accumulation of 0", ("--gradient_accumulation_steps", "0"),
             r"error: --gradient_accumulation_steps must be >= 1$", prog="train_image_classifier"),
    CLIError("push without a repo id", ("--push_to_hub",), r"error: --push_to_hub needs --hub_model_id user/name$",
             prog="train_image_classifier"),
    CLIError("resume from a folder that does not exist", ("--resume_from_checkpoint", "{ws}/missing"),
             r"error: --resume_from_checkpoint .*/missing: no such folder; pass a checkpoint folder "
             r"\(OUTPUT_DIR/checkpoints/step_<k>\) or latest$", prog="train_image_classifier"),
    CLIError("push to an invalid repo id", ("--push_to_hub", "--hub_model_id", "me/x--y"),
             r"error: Invalid --hub_model_id: 'me/x--y' is not a Hub repository id", prog="train_image_classifier"),
    CLIError("no model", (), r"error: one of the arguments --model_name_or_path --tiny is required$",
             prog="finetune_transformer"),
    CLIError("push to an invalid repo id", ("--tiny", "--push_to_hub", "--hub_model_id", "bad id"),
             r"error: Invalid --hub_model_id: 'bad id' is not a Hub repository id", prog="finetune_transformer"),
    CLIError("push without a repo id", ("--tiny", "--push_to_hub"),
             r"error: --push_to_hub needs --hub_model_id user/name$", prog="finetune_transformer"),
    CLIError("resume from a folder that does not exist", ("--tiny", "--resume_from_checkpoint", "{ws}/missing"),
             r"error: --resume_from_checkpoint .*/missing: no such folder; pass a checkpoint folder "
             r"\(OUTPUT_DIR/checkpoint-<step>\) or latest$", prog="finetune_transformer"),
]

CLI_ROWS = [(f"{group}: {row.id}", row) for group, rows in (("compare", COMPARE), ("tree", TREE), ("scripts", SCRIPTS))
            for row in rows]


def _script_parser(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


@pytest.mark.parametrize("row", [r for _, r in CLI_ROWS], ids=[i for i, _ in CLI_ROWS])
def test_command_line_usage_errors(row: CLIError, workspace, capsys, one_thread):
    argv = [a.replace("{ws}", str(workspace)) for a in row.argv]
    if row.prog == "hf-camhd":
        rc = cli_main(argv)
    else:
        with pytest.raises(SystemExit) as info:
            _script_parser(row.prog)(argv)
        rc = info.value.code
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    last = [ln for ln in captured.err.splitlines() if ln.strip()][-1]
    assert re.search(row.regex, last), f"{last!r} does not match {row.regex!r}"


def test_the_tables_cover_every_entry_point():
    groups = {**ENTRY_POINTS, "hf-camhd compare": COMPARE, "hf-camhd tree": TREE, "scripts": SCRIPTS}
    assert all(len(rows) >= 3 for rows in groups.values()), {g: len(r) for g, r in groups.items()}
    assert len(PY_ROWS) + len(CLI_ROWS) >= 60


@pytest.mark.parametrize("argv, message", [
    (["compare", "--output-dir", "{ws}/afile", "--epochs", "1"], "Invalid output_dir"),
    (["compare", "--seeds", "-1"], "expected a positive integer, got '-1'"),
    (["tree", "mlp", "--save", "{ws}/empty"], "cannot write the tree there"),
])
def test_console_script_exits_2_without_traceback(argv, message, workspace):
    """The same through a real process: exit status 2, one message, no traceback."""
    argv = [a.replace("{ws}", str(workspace)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "hf_camhd.cli", *argv], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr.strip().splitlines()[-1]
