"""hf-camhd compare --sweep-hypergrad-lr: the β-sensitivity study (plan, runs on digits, table, figure, flags)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from hf_camhd import CAMHDAdam
from hf_camhd.cli import main
from hf_camhd.experiments import CompareConfig, get_task, plan_runs, run_comparison
from hf_camhd.experiments import runner as runner_module
from hf_camhd.experiments.presets import SWEEP_HYPERGRAD_LRS
from hf_camhd.experiments.results import mean_se, stable_range, summarize_hypergrad_sweep

# note: the additive rule at β = 0.1 on Adam (far above the paper's 1e-7) drives α to alpha_max: the core warns
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:CAMHDAdam. the learned rate of level:RuntimeWarning")]

SWEEP = dict(task="mlp-digits", sweep_hypergrad_lr=True, sweep_betas=(1e-3, 1e-1), seeds=2, epochs=1,
             max_train_samples=128, max_test_samples=200, progress=False)


def test_default_plan_covers_both_rules_and_bases_over_four_decades():
    plan = plan_runs(CompareConfig(sweep_hypergrad_lr=True, seeds=2), get_task("lenet5-fashion-mnist"))
    assert plan[0].key == "adam|seed=0" and plan[1].key == "adam|seed=1"  # each base's reference first
    for (rule, family), grid in SWEEP_HYPERGRAD_LRS.items():
        arm = {"adam": "adam-camhd", "sgd": "sgdn-camhd"}[family] + ("-normalized" if rule == "normalized" else "")
        betas = sorted({s.hypergrad_lr for s in plan if s.arm.name == arm})
        assert betas == sorted(grid) and max(betas) / min(betas) >= 1e4, (rule, family)
        for spec in (s for s in plan if s.arm.name == arm):
            assert spec.hyperparameters["hypergrad_lr"] == spec.hypergrad_lr
            assert spec.hyperparameters["hypergrad_rule"] == rule
            if rule == "additive":  # the paper's arm: Table 1's δ and r, only β swept
                assert (spec.hyperparameters["gamma_lr"], spec.hyperparameters["decay_rate"]) == (0.03, 0.002)
            else:  # δ, ρ, r: the optimizer's defaults
                assert not {"gamma_lr", "decay_rate", "hypergrad_smoothing"} & set(spec.hyperparameters)
    # the paper's β lie on the additive grids
    assert 1e-8 in SWEEP_HYPERGRAD_LRS[("additive", "adam")] and 1e-7 in SWEEP_HYPERGRAD_LRS[("additive", "adam")]
    assert 1e-3 in SWEEP_HYPERGRAD_LRS[("additive", "sgd")] and 1e-6 in SWEEP_HYPERGRAD_LRS[("additive", "sgd")]
    assert len(plan) == 2 * 2 + 2 * sum(len(g) for g in SWEEP_HYPERGRAD_LRS.values())
    keys = [s.key for s in plan]
    assert len(set(keys)) == len(keys) and "sgdn-camhd-normalized|seed=1|hypergrad_lr=0.0001" in keys


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, run_comparison(CompareConfig(**SWEEP, output_dir=str(out)), log=None)


def test_sweep_runs_every_base_rule_beta_and_seed(sweep):
    out, summary = sweep
    data = json.loads((out / "results.json").read_text())
    assert data["kind"] == "sweep-hypergrad-lr" and len(summary.executed) == 2 * (2 + 2 * 2 * 2)
    runs = data["runs"]
    for run in runs:
        assert run["status"] == "finished"
        settings = run["optimizer"]["settings"]
        if run["hypergrad_lr"] is None:
            assert run["arm"] in ("adam", "sgdn") and settings is None
            continue
        assert settings["hypergrad_lr"] == run["hypergrad_lr"]  # the swept β reached the optimizer
        assert run["key"].endswith(f"|hypergrad_lr={run['hypergrad_lr']:g}")
        assert settings["hypergrad_rule"] == ("normalized" if run["arm"].endswith("-normalized") else "additive")
        if settings["hypergrad_rule"] == "normalized":
            defaults = CAMHDAdam([torch.nn.Parameter(torch.zeros(1))]).config
            assert (settings["gamma_lr"], settings["hypergrad_smoothing"]) == (defaults.gamma_lr,
                                                                               defaults.hypergrad_smoothing)
    # the summary: one entry per base, mean ± s.e. and paired Δ to the base on the same seed
    bases = summarize_hypergrad_sweep(data)
    assert [b["base"] for b in bases] == ["adam", "sgdn"]
    for entry in bases:
        assert list(entry["rules"]) == ["additive", "normalized"]
        ref = {r["seed"]: r["final"]["test_accuracy"] for r in runs if r["arm"] == entry["base"]}
        assert entry["reference"]["test_accuracy"] == pytest.approx(sum(ref.values()) / 2)
        for rule, rows in entry["rules"].items():
            assert [r["hypergrad_lr"] for r in rows] == [1e-3, 1e-1]
            for row in rows:
                mine = [r for r in runs if r["hypergrad_lr"] == row["hypergrad_lr"]
                        and r["arm"].startswith(entry["base"] + "-camhd")
                        and r["arm"].endswith("-normalized") == (rule == "normalized")]
                assert len(mine) == 2
                assert (row["test_accuracy"], row["test_accuracy_se"], row["n"]) == pytest.approx(
                    mean_se(r["final"]["test_accuracy"] for r in mine))
                assert row["delta_vs_base"] == pytest.approx(
                    sum(r["final"]["test_accuracy"] - ref[r["seed"]] for r in mine) / 2)
                assert row["diverged"] == 0


def test_sweep_writes_its_table_and_figure(sweep):
    out, summary = sweep
    md = (out / "results.md").read_text()
    assert "## β sensitivity (--sweep-hypergrad-lr)" in md
    assert "### Adam (no adaptation: " in md and "### SGDN (no adaptation: " in md
    assert "| Rule | β | Test acc (%) | Test S.E | Δ acc vs Adam (paired) | Test loss | Runs | NaN/inf runs |" in md
    for rule in ("additive", "normalized"):
        for beta in ("0.001", "0.1"):
            assert md.count(f"| {rule} | {beta} | ") == 2, (rule, beta)  # one row per base
    assert md.count("Widest β range within 0.5 points of the rule's best") == 2
    data = json.loads((out / "results.json").read_text())
    # two panels (one per base), each: the base optimizer's line and one line per rule
    assert data["plots"]["sweep_hypergrad_lr.png"] == {"curves": 2 * (1 + 2), "axes": 2}
    with Image.open(out / "sweep_hypergrad_lr.png") as im:
        im.verify()
    assert "gamma_trajectories.png" not in data["plots"]


def test_sweep_resumes_and_flags_non_finite_losses(sweep, tmp_path, monkeypatch):
    out, first = sweep
    again = run_comparison(CompareConfig(**SWEEP, output_dir=str(out)), log=None)
    assert again.executed == [] and len(again.skipped) == len(first.executed)

    # a run whose test loss is NaN is counted in the table, the summary and the figure (a red ×)
    real = runner_module._evaluate
    calls = {"n": 0}

    def nan_once(model, loader, accelerator, metric):
        calls["n"] += 1
        loss, metrics = real(model, loader, accelerator, metric)
        return (math.nan, metrics) if calls["n"] == 3 else (loss, metrics)  # the 3rd run: normalized, β 1e-3, seed 0

    monkeypatch.setattr(runner_module, "_evaluate", nan_once)
    cfg = dict(SWEEP, sweep_bases=("adam",), sweep_rules=("normalized",), output_dir=str(tmp_path))
    summary = run_comparison(CompareConfig(**cfg), log=None)
    runs = summary.results["runs"]
    assert [r["diverged"] for r in runs] == [False, False, True, False, False, False]
    rows = summarize_hypergrad_sweep(summary.results)[0]["rules"]["normalized"]
    assert [r["diverged"] for r in rows] == [1, 0]
    assert "| normalized | 0.001 | " in summary.markdown and " | 2 | 1 |" in summary.markdown


def test_stable_range_is_the_widest_run_near_the_best_without_non_finite_losses():
    rows = [{"hypergrad_lr": b, "test_accuracy": a, "diverged": d} for b, a, d in [
        (1e-4, 88.0, 0), (1e-3, 89.6, 0), (1e-2, 90.0, 0), (1e-1, 89.7, 1), (1.0, 89.8, 0), (10.0, 80.0, 0)]]
    assert stable_range(rows) == {"best": 90.0, "best_hypergrad_lr": 1e-2, "low": 1e-3, "high": 1e-2,
                                  "ratio": pytest.approx(10.0), "points": 2}
    rows[3]["diverged"] = 0
    assert stable_range(rows)["low"] == 1e-3 and stable_range(rows)["high"] == 1.0
    assert stable_range(rows, tolerance=0.1)["points"] == 1
    assert stable_range([{"hypergrad_lr": 1.0, "test_accuracy": None, "diverged": 0}]) is None


@pytest.mark.parametrize("argv, message", [
    (["--bases", "adam"], "Invalid --bases: it sets the β sweep; add --sweep-hypergrad-lr"),
    (["--sweep-hypergrad-lr", "--bases", "adam,lion"], "Invalid --bases value: 'lion'; expected some of adam, adamw"),
    (["--sweep-hypergrad-lr", "--rules", "multiplicative"], "Invalid --rules value: 'multiplicative'"),
    (["--sweep-hypergrad-lr", "--betas", "0,1e-3"], "Invalid --betas value: 0.0; every β must be a finite number > 0"),
])
def test_sweep_flag_errors_exit_2(argv, message, tmp_path, capsys):
    assert main(["compare", *argv, "--output-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_loss_axes_turn_logarithmic_when_a_run_blows_up():
    from matplotlib.figure import Figure

    from hf_camhd.experiments.plots import _log_scale_if_wide

    ax = Figure().subplots()
    ax.plot([1, 2], [2.3, 0.4])
    ax.plot([1, 2], [2.2, 0.5])
    _log_scale_if_wide(ax)
    assert ax.get_yscale() == "linear"  # ordinary curves keep a linear axis
    ax.plot([1, 2], [2.3, 4e33])  # a run whose loss blew up (the digits sweep's SGD-N, additive β = 0.1)
    _log_scale_if_wide(ax)
    assert ax.get_yscale() == "log"
