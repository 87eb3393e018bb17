"""The comparison tool (hf_camhd.experiments): outputs, plots, resume, sweep, presets, and every arm learning."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from hf_camhd.data import DatasetUnavailableError
from hf_camhd.experiments import (
    CompareConfig,
    arm_hyperparameters,
    get_task,
    list_tasks,
    plan_runs,
    resolve_arm,
    resolve_task,
    run_comparison,
)
from hf_camhd.experiments import runner as runner_module
from hf_camhd.experiments.arms import BASELINE_ARMS, HD_ARMS, LR_FREE_ARMS, build_optimizer
from hf_camhd.experiments.models import build_model, logits_of
from hf_camhd.experiments.results import load_results, mean_se, summarize

MICRO = dict(task="mlp-digits", optimizers=("adam", "adam-hd", "adam-camhd"), seeds=2, epochs=2,
             max_train_samples=200, log_every=2, progress=False)


def _png_ok(path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 200 and im.size[1] > 200


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    out = tmp_path_factory.mktemp("micro")
    summary = run_comparison(CompareConfig(**MICRO, output_dir=str(out)), log=None)
    return out, summary


def test_micro_compare_writes_results_json_md_and_plots(micro):
    out, summary = micro
    assert len(summary.executed) == 6 and not summary.skipped
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 1 and data["kind"] == "compare"
    assert data["config"]["optimizers"] == ["adam", "adam-hd", "adam-camhd"]
    assert data["data"] == {**data["data"], "dataset": "digits", "train_size": 200, "test_size": 359}
    assert [r["key"] for r in data["runs"]] == [f"{a}|seed={s}" for a in MICRO["optimizers"] for s in (0, 1)]
    for run in data["runs"]:
        assert run["status"] == "finished" and run["wall_time_s"] > 0
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        for e in run["epochs"]:
            assert e["train_loss"] > 0 and e["test_loss"] > 0 and 0 <= e["test_accuracy"] <= 100
        assert run["final"]["test_accuracy"] == run["epochs"][-1]["test_accuracy"]
        if run["arm"] == "adam":
            assert run["hyper_log"] == [] and run["final"]["gamma"] is None
        else:  # γ and mean α per level at step 0, every log_every steps and at the end
            levels = ["global"] if run["arm"] == "adam-hd" else ["global", "layer"]
            steps = [h["step"] for h in run["hyper_log"]]
            assert steps[0] == 0 and steps[-1] == 2 * run["steps_per_epoch"] and steps == sorted(set(steps))
            for h in run["hyper_log"]:
                assert list(h["gamma"]) == levels and list(h["alpha_mean"]) == levels
                assert math.isclose(sum(h["gamma"].values()), 1.0, rel_tol=1e-5)
                assert all(a > 0 for a in h["alpha_mean"].values())
            assert run["final"]["gamma"] == run["hyper_log"][-1]["gamma"]
    # the optimizer arms used the preset's settings
    camhd = next(r for r in data["runs"] if r["arm"] == "adam-camhd")["optimizer"]
    assert camhd["class"] == "CAMHDAdam" and camhd["hyperparameters"]["levels"] == ["global", "layer"]
    assert camhd["hyperparameters"]["gamma"] == [0.5, 0.5] and camhd["hyperparameters"]["gamma_lr"] == 0.01

    md = (out / "results.md").read_text()
    assert "| Optimizer | Test acc (%) | Test S.E |" in md and "Adam-CAM-HD" in md and "γ (final)" in md
    assert md.count("**") >= 2  # the best mean accuracy is in bold
    assert "± " in md

    # plots: PNGs that open, with one mean curve per arm and metric / per level and row
    assert set(data["plots"]) == {"learning_curves.png", "gamma_trajectories.png"}
    assert data["plots"]["learning_curves.png"] == {"curves": 3 * 3, "axes": 3}
    assert data["plots"]["gamma_trajectories.png"] == {"curves": 2 * (1 + 2), "axes": 4}
    for name in data["plots"]:
        _png_ok(out / name)


def test_summary_is_mean_and_standard_error(micro):
    _, summary = micro
    rows = {r["arm"]: r for r in summarize(summary.results)}
    accs = [r["final"]["test_accuracy"] for r in summary.results["runs"] if r["arm"] == "adam-hd"]
    mean = sum(accs) / 2
    se = abs(accs[0] - accs[1]) / 2  # sd/sqrt(2) with two values
    assert rows["adam-hd"]["n"] == 2
    assert rows["adam-hd"]["test_accuracy"] == pytest.approx(mean)
    assert rows["adam-hd"]["test_accuracy_se"] == pytest.approx(se)
    assert mean_se([1.0]) == (1.0, None, 1) and mean_se([None, float("nan")]) == (None, None, 0)
    # paired with Adam on the same seed
    by_key = {r["key"]: r["final"]["test_accuracy"] for r in summary.results["runs"]}
    diffs = [by_key[f"adam-camhd|seed={s}"] - by_key[f"adam|seed={s}"] for s in (0, 1)]
    assert rows["adam-camhd"]["reference"] == "adam"
    assert rows["adam-camhd"]["delta_vs_reference"] == pytest.approx(sum(diffs) / 2)
    assert rows["adam-camhd"]["delta_vs_reference_se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)
    assert "Δ acc vs Adam (paired)" in summary.markdown


def test_resume_skips_finished_runs_and_reruns_unfinished(micro, tmp_path):
    out, first = micro
    again = run_comparison(CompareConfig(**MICRO, output_dir=str(out)), log=None)
    assert again.executed == [] and len(again.skipped) == 6
    assert [r["epochs"] for r in again.results["runs"]] == [r["epochs"] for r in first.results["runs"]]

    # an interrupted comparison: one run half-way ("running"), one never started
    data = load_results(out / "results.json")
    partial = tmp_path / "partial"
    partial.mkdir()
    runs = data["runs"]
    runs[3] = {**runs[3], "status": "running", "epochs": runs[3]["epochs"][:1]}
    data["runs"] = runs[:4]
    (partial / "results.json").write_text(json.dumps(data))
    resumed = run_comparison(CompareConfig(**MICRO, output_dir=str(partial), plots=False), log=None)
    assert resumed.executed == [runs[3]["key"], first.results["runs"][4]["key"], first.results["runs"][5]["key"]]
    assert len(resumed.skipped) == 3
    # deterministic: the rerun reproduces the uninterrupted run's numbers
    strip = lambda r: [{k: v for k, v in e.items() if k != "wall_time_s"} for e in r["epochs"]]  # noqa: E731
    assert [strip(r) for r in resumed.results["runs"]] == [strip(r) for r in first.results["runs"]]
    assert (partial / "results.previous.json").exists()


def test_changed_configuration_reruns(micro, tmp_path):
    out, _ = micro
    data = load_results(out / "results.json")
    (tmp_path / "results.json").write_text(json.dumps(data))
    cfg = CompareConfig(**{**MICRO, "optimizers": ("adam",), "seeds": 1, "epochs": 1}, output_dir=str(tmp_path),
                        plots=False)
    summary = run_comparison(cfg, log=None)
    assert summary.executed == ["adam|seed=0"]  # epochs changed: the old run's hash differs
    assert (tmp_path / "results.previous.json").exists()


def test_sweep_gamma_writes_its_plot(tmp_path):
    cfg = CompareConfig(task="mlp-digits", sweep_gamma=True, sweep_values=(0.0, 0.5, 1.0), seeds=2, epochs=1,
                        max_train_samples=128, progress=False, output_dir=str(tmp_path))
    summary = run_comparison(cfg, log=None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["kind"] == "sweep-gamma" and len(summary.executed) == 6
    for run in data["runs"]:
        hp = run["optimizer"]["hyperparameters"]
        assert hp["gamma_lr"] == 0.0 and hp["levels"] == ["global", "layer"]
        g = run["gamma_global"]
        assert hp["gamma"] == pytest.approx([g, 1 - g])
        assert run["final"]["gamma"]["global"] == pytest.approx(g, abs=1e-6)  # fixed γ (δ = 0)
    assert data["plots"]["sweep_gamma.png"] == {"curves": 1, "axes": 1}
    assert data["plots"]["learning_curves.png"]["curves"] == 3 * 3
    _png_ok(tmp_path / "sweep_gamma.png")
    md = (tmp_path / "results.md").read_text()
    assert "Fixed-γ sweep" in md and "| 0.5 |" in md


# note: D-Adapt Adam (it overshoots in epoch 2 here: 2.31 -> 2.71 -> 1.50) and DoG / LDoG (their first ~150 steps are
# tiny by design) learn too, over a longer run: tests/test_compare_baselines.py
SLOW_STARTERS = ("dadapt-adam", "dog", "ldog")
ALL_ARMS = (*BASELINE_ARMS, *(a for a in LR_FREE_ARMS if a not in SLOW_STARTERS), *HD_ARMS, "adam-camhd", "adam-camhd-2level", "adam-camhd-3level",
            "adamw-camhd", "sgd-camhd", "sgdn-camhd", "sgdn-camhd-3level", "adam-camhd-normalized",
            "adamw-camhd-normalized", "sgdn-camhd-normalized", "sgd-camhd-3level-normalized", "sfadamw-camhd")


def test_every_arm_reduces_the_loss(tmp_path):
    # 30 steps of batch 32 on 320 digits; every epoch's mean train loss must fall, and the test loss end
    # below the chance level ln(10) (RAdam's warm-up makes it the slowest: about 2.32 -> 2.29)
    cfg = CompareConfig(task="mlp-digits", optimizers=ALL_ARMS, seeds=1, epochs=3, batch_size=32,
                        max_train_samples=320, progress=False, plots=False, output_dir=str(tmp_path))
    summary = run_comparison(cfg, log=None)
    assert len(summary.executed) == len(ALL_ARMS)
    for run in summary.results["runs"]:
        losses = [e["train_loss"] for e in run["epochs"]]
        assert not run["diverged"], run["key"]
        assert all(b < a for a, b in zip(losses, losses[1:])), (run["key"], losses)
        assert run["final"]["test_loss"] < math.log(10), run["key"]


def test_sgd_family_follows_the_step_schedule(tmp_path, monkeypatch):
    preset = replace(get_task("mlp-digits"), sgd_milestones=(1,), sgd_lr_factor=0.1)
    monkeypatch.setattr(runner_module, "get_task", lambda name: preset)
    cfg = CompareConfig(optimizers=("sgdn", "sgdn-camhd", "adam"), seeds=1, epochs=2, max_train_samples=128,
                        progress=False, plots=False, output_dir=str(tmp_path))
    runs = {r["arm"]: r for r in run_comparison(cfg, log=None).results["runs"]}
    for arm in ("sgdn", "sgdn-camhd"):
        assert [e["lr_factor"] for e in runs[arm]["epochs"]] == pytest.approx([0.1, 0.1])
        assert runs[arm]["optimizer"]["lr_schedule"]["milestones"] == [1]
    assert [e["lr_factor"] for e in runs["adam"]["epochs"]] == [1.0, 1.0]
    assert runs["adam"]["optimizer"]["lr_schedule"] is None
    # CAM-HD reads the scheduler's lr as a multiplier on its learned rates
    last = runs["sgdn-camhd"]["hyper_log"][-1]
    alpha_star = sum(last["gamma"][lv] * last["alpha_mean"][lv] for lv in last["gamma"])
    assert last["effective_lr_mean"] < 0.5 * alpha_star


def test_missing_dataset_raises_the_clear_error(tmp_path):
    cfg = CompareConfig(dataset="cifar10", data_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "o"),
                        progress=False)
    with pytest.raises(DatasetUnavailableError, match="cifar10"):
        run_comparison(cfg, log=None)
    assert not (tmp_path / "o").exists()


def test_bad_arm_and_bad_sweep_fail_before_training():
    with pytest.raises(ValueError, match="Unknown optimizer 'adamx'"):
        plan_runs(CompareConfig(optimizers=("adamx",)), get_task("mlp-digits"))
    with pytest.raises(ValueError, match="sweep"):
        plan_runs(CompareConfig(sweep_gamma=True, optimizers=("adam",)), get_task("mlp-digits"))
    with pytest.raises(ValueError, match="two-level"):
        plan_runs(CompareConfig(sweep_gamma=True, levels=("global", "layer", "unit")), get_task("mlp-digits"))
    with pytest.raises(ValueError, match="seeds"):
        CompareConfig(seeds=0)


# ------------------------------------------------------------------------------------------------ presets
def test_presets_follow_table_1():
    assert set(list_tasks()) >= {"mlp-mnist", "lenet5-mnist", "lenet5-cifar10", "lenet5-svhn", "resnet18-cifar10",
                                 "resnet34-cifar10"}
    lenet = get_task("lenet5-cifar10")
    kw = arm_hyperparameters(resolve_arm("adam-camhd"), lenet)
    assert kw == {"lr": 1e-3, "weight_decay": 0.0, "hypergrad_lr": 1e-8, "hypergrad_rule": "additive",
                  "levels": ["global", "unit"], "gamma": [0.8, 0.2], "gamma_lr": 0.03, "decay_rate": 0.002}
    assert get_task("lenet5-svhn").batch_size == 128 and lenet.batch_size == 256
    mlp = get_task("mlp-mnist")
    assert arm_hyperparameters(resolve_arm("adam-camhd-3level"), mlp)["levels"] == ["global", "layer", "parameter"]
    assert arm_hyperparameters(resolve_arm("adam-camhd-3level"), mlp)["gamma"] == [0.4, 0.3, 0.3]
    assert arm_hyperparameters(resolve_arm("adam-camhd-2level"), mlp)["gamma"] == [0.5, 0.5]
    assert arm_hyperparameters(resolve_arm("adam-hd"), mlp) == {"lr": 1e-3, "weight_decay": 0.0,
                                                                "hypergrad_lr": 1e-7, "hypergrad_rule": "additive"}
    resnet = get_task("resnet18-cifar10")
    kw = arm_hyperparameters(resolve_arm("sgdn-camhd"), resnet)
    assert (kw["lr"], kw["momentum"], kw["hypergrad_lr"], kw["gamma_lr"], kw["decay_rate"]) == (0.1, 0.9, 1e-6, 1e-3,
                                                                                               1e-3)
    assert resnet.sgd_milestones == (150,) and resnet.epochs == 200
    # --levels / --gamma replace the default tree of the *-camhd arms only
    kw = arm_hyperparameters(resolve_arm("adam-camhd"), lenet, levels=("global", "layer", "unit"),
                             gamma=(0.5, 0.3, 0.2))
    assert kw["levels"] == ["global", "layer", "unit"] and kw["gamma"] == [0.5, 0.3, 0.2]
    assert arm_hyperparameters(resolve_arm("adam-camhd-3level"), lenet,
                               levels=("global", "layer"))["levels"] == ["global", "layer", "parameter"]
    assert resolve_arm("sgdm_camhd").name == "sgd-camhd" and resolve_arm("L4").name == "adam-l4"


def test_preset_docstring_table_matches_the_presets():
    from hf_camhd.experiments import presets

    rows = [ln.strip("|").split("|") for ln in presets.__doc__.splitlines() if ln.startswith("| ") and "task" not in ln]
    assert len(rows) == len(list_tasks())
    for cells in rows:
        name, _, dataset, batch, epochs, adam_lr, sgd_lr, betas, delta, r = (c.strip() for c in cells)
        t = get_task(name.split()[0])
        beta_adam, beta_sgd = (float(v) for v in betas.split("/"))
        assert (t.dataset, t.batch_size, t.epochs) == (dataset, int(batch), int(epochs)), name
        assert (t.adam_lr, t.sgd_lr, t.adam_hypergrad_lr, t.sgd_hypergrad_lr, t.gamma_lr, t.decay_rate) == (
            float(adam_lr), float(sgd_lr), beta_adam, beta_sgd, float(delta), float(r)), name


def test_resolve_task_overrides():
    preset = resolve_task(CompareConfig(task="lenet5-mnist", dataset="fashion-mnist", epochs=3, batch_size=32))
    assert (preset.dataset, preset.epochs, preset.batch_size, preset.model) == ("fashion_mnist", 3, 32, "lenet5")
    assert resolve_task(CompareConfig(task="mlp-mnist", model="lenet5")).model_kwargs == {}


@pytest.mark.parametrize("name", ["resnet18", "lenet5", "mlp"])
def test_models_build_and_every_arm_builds_on_them(name):
    from hf_camhd.data import dataset_info

    info = dataset_info("cifar10")
    torch.manual_seed(0)
    model = build_model(name, info, {"hidden_sizes": (16,)} if name == "mlp" else None)
    logits = logits_of(model(torch.randn(2, 3, 32, 32)))
    assert logits.shape == (2, 10)
    if name == "resnet18":  # the CIFAR stem: 3x3 stride 1, no max-pool
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, torch.nn.Identity)
    preset = get_task("resnet18-cifar10")
    for arm in ("adam", "adam-l4", "sgdn", "adam-hd", "adam-camhd", "sgdn-camhd", "adam-camhd-3level"):
        a = resolve_arm(arm)
        opt = build_optimizer(a, model, arm_hyperparameters(a, preset))
        if a.kind == "camhd":
            assert opt.levels == tuple(arm_hyperparameters(a, preset)["levels"])


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path):
    """torchrun (gloo, CPU) with 2 processes and the same global batch gives the single process's numbers;
    the test split is gathered without duplicates; only the main process writes."""
    import os
    import subprocess
    import sys

    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, always there with torch
    args = ["compare", "--optimizers", "adam-camhd,adam-l4", "--seeds", "1", "--epochs", "1",
            "--max-train-samples", "256", "--no-progress", "--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*torchrun, "--nproc_per_node", "2", "-m", "hf_camhd.cli", *args, "--output-dir",
                           str(tmp_path / "ddp")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    single = run_comparison(CompareConfig(optimizers=("adam-camhd", "adam-l4"), seeds=1, epochs=1,
                                          max_train_samples=256, progress=False, plots=False,
                                          output_dir=str(tmp_path / "one")), log=None).results
    assert ddp["environment"]["num_processes"] == 2 and ddp["data"]["test_size"] == 359
    for a, b in zip(ddp["runs"], single["runs"]):
        assert a["key"] == b["key"] and a["steps_per_epoch"] == b["steps_per_epoch"] == 4
        assert a["epochs"][0]["train_loss"] == pytest.approx(b["epochs"][0]["train_loss"], rel=1e-5)
        assert a["epochs"][0]["test_accuracy"] == pytest.approx(b["epochs"][0]["test_accuracy"], abs=1e-9)
