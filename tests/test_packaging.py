"""Packaging: the package list covers every subpackage, data files ship, and the core needs torch alone."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["hf_camhd*"]))
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
    assert "hf_camhd.model_cards" in listed


def test_card_templates_resolve():
    from hf_camhd.hub import CARD_TEMPLATES, template_path

    for name in [*CARD_TEMPLATES.values(), "_training.md"]:
        assert template_path(name).read_text().strip()


def test_fused_kernel_source_ships_as_package_data():
    import fnmatch

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    sources = [p.relative_to(ROOT / "hf_camhd" / "optim").as_posix()
               for p in (ROOT / "hf_camhd" / "optim" / "csrc").glob("*")]
    assert sources and all(any(fnmatch.fnmatch(s, pat) for pat in data["hf_camhd.optim"]) for s in sources)


# ------------------------------------------------------------------------------------------ torch-only core
def _torch_only_site(folder: Path) -> Path:
    """A site folder with torch and what torch itself requires (from the installed metadata), and nothing else:
    what `pip install hf_camhd` gives. Built with symlinks, so nothing is downloaded."""
    from importlib import metadata

    from packaging.requirements import Requirement

    dists, todo = {}, ["torch"]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in dists:
            continue
        dist = dists[key] = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    site = folder / "site-packages"
    site.mkdir(parents=True)
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or []}:
            if top in ("..", "__pycache__") or top.endswith(".pth") or (site / top).exists():
                continue
            (site / top).symlink_to(root / top)
    return site


TORCH_ONLY_CHECK = r'''
import sys, warnings
import torch                                   # (torch may warn that numpy is missing: that is torch's)
warnings.simplefilter("error")
import hf_camhd
from hf_camhd import CAMHDAdam, CAMHDSGD, build_hierarchy

model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
opt = CAMHDAdam(model, lr=1e-2, levels=("global", "block", "layer", "unit"), hypergrad_lr=1e-4, hypergrad_rule="additive", gamma_lr=0.1)
for _ in range(3):
    opt.zero_grad()
    model(torch.randn(5, 4)).pow(2).mean().backward()
    opt.step()
assert opt.num_steps == 3 and build_hierarchy(model, "global,block").num_nodes("block") == 2
CAMHDSGD(model, lr=0.1, momentum=0.9, nesterov=True)
for extra_pkg in ("transformers", "accelerate", "datasets", "timm", "evaluate", "huggingface_hub", "numpy",
                  "matplotlib", "sklearn"):
    assert extra_pkg not in sys.modules, extra_pkg

for statement, feature, extra in MODULES:
    try:
        exec(statement)
    except ImportError as err:
        msg = str(err)
        assert msg.startswith(feature + " needs ") and msg.endswith(f"pip install 'hf_camhd[{extra}]'"), (feature, msg)
        assert err.__cause__ is None and err.__suppress_context__, feature  # one error, no chained traceback
    else:
        raise AssertionError(f"{statement!r} worked without its extra")

from hf_camhd.cli import main                  # the console script: help works, compare names the extra
assert main(["compare", "--help"]) == 0
assert main(["compare", "--seeds", "1"]) == 2
print("torch-only ok")
'''

EXTRA_MODULES = [  # (statement, what the error names, the extra it names)
    *[(f"import hf_camhd.{m}", f"hf_camhd.{m}", "hf") for m in (
        "integrations.transformers", "integrations.accelerate", "integrations.timm", "integrations.timm_train",
        "models", "metrics", "hub")],
    ("from hf_camhd.data import load_image_dataset", "hf_camhd.data", "hf"),
    ("from hf_camhd.experiments import run_comparison", "hf-camhd compare", "experiments"),
]


def test_core_imports_and_trains_with_torch_alone_and_extras_name_themselves(tmp_path):
    """`pip install hf_camhd` (torch only): the optimizers and trees work; every module that needs an extra
    says which one, in one ImportError. The interpreter sees torch's own dependency closure and the checkout."""
    from hf_camhd.optim import _fused

    site = _torch_only_site(tmp_path)
    code = f"MODULES = {EXTRA_MODULES!r}\n" + TORCH_ONLY_CHECK
    # note: the suite's kernel cache (its build takes minutes on 2 cores; compiling is tested in test_optim_fused)
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]),
           "HF_CAMHD_CACHE": str(_fused.cache_dir()), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "torch-only ok" in done.stdout and "--sweep-gamma" in done.stdout
    assert ("hf-camhd: error: hf-camhd compare needs accelerate, which is not installed: "
            "pip install 'hf_camhd[experiments]'") in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------ README commands
def _readme_commands() -> list[str]:
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)  # the first screen's two commands
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_first_screen_installs_what_each_command_needs_and_ci_runs_command_2():
    main_job, tests = _readme_commands()
    assert main_job == 'pip install -e ".[all]" && hf-camhd compare'
    assert tests.endswith('pip install -e ".[test]" && python -m pytest -q')
    assert "apt-get install -y -qq dataset-fashion-mnist" in tests  # the data the Fashion-MNIST test reads
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == tests  # CI runs README command 2, exactly


def test_extras_cover_the_packages_and_the_test_extra_installs_everything():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch"]
    names = {extra: {d.split(">")[0].split("[")[0] for d in deps} for extra, deps in extras.items()}
    assert {"transformers", "accelerate", "datasets", "timm", "evaluate", "huggingface_hub", "safetensors"} <= names["hf"]
    assert {"matplotlib", "scikit-learn", "tqdm", "pillow"} <= names["experiments"]
    assert {"prodigyopt", "schedulefree", "dadaptation", "dog-optimizer"} <= names["experiments"]  # compare's arms
    assert "hf_camhd[hf]" in extras["experiments"] and "hf_camhd[hf,experiments]" in extras["all"]
    assert "hf_camhd[all]" in extras["test"] and {"pytest", "hypothesis"} <= names["test"]
    from hf_camhd._extras import EXTRA_OF

    pip_name = {"sklearn": "scikit-learn", "PIL": "pillow", "dog": "dog-optimizer"}
    for module, extra in EXTRA_OF.items():  # the extra an ImportError names really installs the package
        assert pip_name.get(module, module) in names[extra], module


def test_optim_stays_readable_no_short_module_aliases_and_a_thin_step():
    """The core's layout promises: no module alias shorter than three letters in ``hf_camhd/optim`` (they read as
    the maths' symbols), and ``step()`` a thin driver that fits on one screen."""
    import ast
    import inspect

    from hf_camhd.optim.camhd import CAMHDOptimizer

    for path in sorted((ROOT / "hf_camhd" / "optim").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                short = [a.asname for a in node.names if a.asname and len(a.asname) < 3]
                assert not short, f"{path.name}:{node.lineno}: module alias {short}"
    assert len(inspect.getsource(CAMHDOptimizer.step).splitlines()) <= 40
