"""The ``hf-camhd`` command: help, the small default, clean errors, and the ``tree`` pass-through."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from hf_camhd.cli import build_parser, main
from hf_camhd.experiments import CompareConfig, plan_runs, resolve_task


def test_compare_help(capsys):
    assert main(["compare", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--task", "--model", "--dataset", "--optimizers", "--seeds", "--epochs", "--batch-size", "--levels",
                 "--gamma", "--device", "--output-dir", "--data-dir", "--sweep-gamma", "--max-train-samples",
                 "--log-every", "resnet18-cifar10", "adam-camhd-3level", "accelerate launch"):
        assert flag in out, flag


def test_top_level_help_and_version(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "compare" in out and "tree" in out
    assert main(["--version"]) == 0
    assert "hf_camhd" in capsys.readouterr().out


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "hf_camhd.cli", "compare", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--sweep-gamma" in proc.stdout


HEAVY = ("transformers", "timm", "datasets", "matplotlib", "accelerate", "evaluate", "sklearn", "huggingface_hub",
         "pyarrow", "pandas")


@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"]])
def test_help_imports_no_model_data_or_plot_stack(argv):
    code = ("import sys, json\nfrom hf_camhd.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
            f"    print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: hf-camhd" in proc.stdout
    assert json.loads(proc.stderr.strip().splitlines()[-1]) == []


def test_a_normal_run_prints_no_warning(tmp_path):
    """The default task for one seed and epoch, progress bar on (it shows the loss every 20 steps), in a fresh
    interpreter: nothing on stderr but the progress bar."""
    proc = subprocess.run([sys.executable, "-m", "hf_camhd.cli", "compare", "--seeds", "1", "--epochs", "1",
                           "--optimizers", "adam-camhd", "--output-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loss=" in proc.stderr  # the bar ran past step 20, where it reports the loss
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr[-2000:]


def test_no_arguments_is_the_small_default():
    args = build_parser().parse_args(["compare"])
    assert (args.task, args.seeds, args.optimizers, args.epochs, args.device) == ("mlp-digits", 3, None, None, "auto")
    cfg = CompareConfig()
    preset = resolve_task(cfg)
    assert (preset.model, preset.dataset) == ("mlp", "digits")
    runs = plan_runs(cfg, preset)
    assert [r.key for r in runs] == [f"{a}|seed={s}" for a in ("adam", "adam-hd", "adam-camhd", "adam-camhd-normalized")
                                              for s in (0, 1, 2)]


def test_shortened_default_prints_the_table(tmp_path, capsys):
    out_dir = tmp_path / "out"
    rc = main(["compare", "--epochs", "1", "--max-train-samples", "200", "--output-dir", str(out_dir),
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| Optimizer | Test acc (%) | Test S.E |" in out
    for name in ("Adam", "Adam-HD", "Adam-CAM-HD", "Adam-CAM-HD (normalized)", "γ (final)", "mean α per level", "global",
                 "layer"):
        assert name in out
    data = json.loads((out_dir / "results.json").read_text())
    assert len(data["runs"]) == 12 and data["command"].startswith("hf-camhd compare --epochs 1")
    for run in data["runs"]:  # evaluate's metric names and values, beside the percentage
        assert run["final"]["test_metrics"] == {"accuracy": pytest.approx(run["final"]["test_accuracy"] / 100)}
        assert set(run["epochs"][-1]["test_metrics"]) == {"accuracy"}
    assert (out_dir / "results.md").read_text().count("hf-camhd compare --epochs 1") == 1
    assert {"learning_curves.png", "gamma_trajectories.png"} <= {p.name for p in out_dir.iterdir()}


def test_missing_dataset_is_one_clear_message(tmp_path, capsys):
    rc = main(["compare", "--dataset", "cifar10", "--data-dir", str(tmp_path / "missing"),
               "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("hf-camhd: error: Dataset 'cifar10'")
    assert "uoft-cs/cifar10" in lines[0]  # says how to get it


@pytest.mark.parametrize("argv, message", [
    (["compare", "--optimizers", "adam,nope"], "Unknown optimizer 'nope'"),
    (["compare", "--levels", "global,layer", "--gamma", "1,2,3", "--epochs", "1", "--max-train-samples", "64"],
     "Invalid gamma"),
    (["compare", "--task", "nope"], "Unknown task 'nope'"),
])
def test_bad_arguments_are_clean_errors(argv, message, tmp_path, capsys):
    assert main([*argv, "--output-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_tree_forwards_its_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("hf_camhd.hierarchy.__main__")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "hf_camhd.hierarchy.__main__", fake)
    assert main(["tree", "--model", "resnet18", "--help"]) == 0
    assert seen["argv"] == ["--model", "resnet18", "--help"]


def test_tree_subcommand_help(capsys):
    pytest.importorskip("hf_camhd.hierarchy.__main__")
    assert main(["tree", "--help"]) == 0
    assert "hf-camhd tree" in capsys.readouterr().out


def test_tree_missing_module_is_a_clean_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hf_camhd.hierarchy.__main__", None)  # import raises ModuleNotFoundError
    assert main(["tree"]) == 2
    assert "not available" in capsys.readouterr().err
