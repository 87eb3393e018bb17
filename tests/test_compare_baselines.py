"""hf-camhd compare with the learning-rate-free baselines (Prodigy, Schedule-Free AdamW, D-Adapt Adam, DoG / LDoG) and
the new CAM-HD arms (the normalized rule, CAM-HD over Schedule-Free): offline on digits, the train / eval switch,
DoG's averaged evaluation and the optimizers' defaults flowing through (their resume: tests/test_compare_resume.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from hf_camhd import CAMHDAdam, CAMHDSGD
from hf_camhd.cli import main
from hf_camhd.experiments import CompareConfig, arm_hyperparameters, get_task, resolve_arm, run_comparison
from hf_camhd.experiments import runner as runner_module
from hf_camhd.experiments.arms import SCHEDULE_FREE_WARMUP, build_optimizer, uses_schedule
from hf_camhd.experiments.models import build_model, logits_of
from hf_camhd.experiments.runner import checkpoint_path

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(task="mlp-digits", seeds=1, epochs=2, max_train_samples=192, log_every=2, progress=False, plots=False)
BRIEF = "prodigy,schedulefree-adamw,dadapt-adam,dog,adam,adam-camhd"


def test_the_learning_rate_free_arms_run_offline_on_digits(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compare", "--optimizers", BRIEF, "--seeds", "1", "--epochs", "2", "--max-train-samples", "192",
               "--no-progress", "--output-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("Prodigy", "Schedule-Free AdamW", "D-Adapt Adam", "DoG (averaged)", "Adam", "Adam-CAM-HD"):
        assert f"| {name} |" in printed or f"| **{name}** |" in printed, name
    data = json.loads((out / "results.json").read_text())
    runs = {r["arm"]: r for r in data["runs"]}
    assert list(runs) == BRIEF.split(",")
    assert set(data["environment"]["optimizer_packages"]) == {"prodigyopt", "schedulefree", "dadaptation",
                                                              "dog-optimizer"}
    classes = {a: r["optimizer"]["class"] for a, r in runs.items()}
    assert classes == {"prodigy": "Prodigy", "schedulefree-adamw": "AdamWScheduleFree", "dadapt-adam": "DAdaptAdam",
                       "dog": "DoG", "adam": "Adam", "adam-camhd": "CAMHDAdam"}
    for arm, run in runs.items():
        assert run["status"] == "finished" and len(run["epochs"]) == 2, arm
        assert all(math.isfinite(e["train_loss"]) and e["train_loss"] > 0 for e in run["epochs"]), arm
    # the step sizes the learning-rate-free optimizers chose are in the record (d·lr, DoG's η), and they grew
    for arm in ("prodigy", "dadapt-adam", "dog"):
        lrs = [e["adapted_lr"] for e in runs[arm]["epochs"]]
        assert 0 < lrs[0] < lrs[1], (arm, lrs)
    assert "adapted_lr" not in runs["adam"]["epochs"][0]
    assert runs["schedulefree-adamw"]["optimizer"]["train_eval_switch"] is True
    assert runs["dog"]["optimizer"]["averaging"] == {"type": "PolynomialDecayAverager", "gamma": 8.0,
                                                     "evaluated": "averaged model"}
    assert runs["prodigy"]["optimizer"]["hyperparameters"] == {"lr": 1.0, "weight_decay": 0.0, "decouple": False,
                                                               "safeguard_warmup": False}
    # the paper's arm keeps its additive rule and Table 1's β
    assert runs["adam-camhd"]["optimizer"]["settings"]["hypergrad_rule"] == "additive"
    assert runs["adam-camhd"]["optimizer"]["settings"]["hypergrad_lr"] == 1e-7


def test_normalized_and_schedule_free_camhd_arms_take_the_optimizers_defaults(tmp_path, monkeypatch):
    arms = ("adam-camhd-normalized", "sgdn-camhd-normalized", "adamw-camhd-normalized", "sfadamw-camhd")
    cfg = dict(TINY, optimizers=arms, output_dir=str(tmp_path))
    first = run_comparison(CompareConfig(**cfg), log=None).results
    model = torch.nn.Linear(3, 2)
    expected = {"adam": CAMHDAdam(model, hypergrad_rule="normalized").config,
                "sgdn": CAMHDSGD(model, hypergrad_rule="normalized").config}
    for run in first["runs"]:
        hp, settings = run["optimizer"]["hyperparameters"], run["optimizer"]["settings"]
        assert not {"hypergrad_lr", "gamma_lr", "hypergrad_smoothing", "decay_rate"} & set(hp), run["arm"]  # not set
        default = expected["sgdn" if run["arm"].startswith("sgdn") else "adam"]
        for key in ("hypergrad_rule", "hypergrad_lr", "gamma_lr", "hypergrad_smoothing", "decay_rate"):
            assert settings[key] == getattr(default, key), (run["arm"], key)
        assert run["hyper_log"][-1]["gamma"] != run["hyper_log"][0]["gamma"]  # δ > 0 by default: γ learned
        assert hp["levels"] == ["global", "layer"] and hp["gamma"] == [0.5, 0.5]  # the task's tree
    sf = next(r for r in first["runs"] if r["arm"] == "sfadamw-camhd")
    assert sf["optimizer"]["class"] == "CAMHDScheduleFreeAdamW" and sf["optimizer"]["train_eval_switch"] is True
    assert sf["optimizer"]["hyperparameters"]["lr"] == 0.0025

    # a later change of the optimizer's default flows through, and the runs made under the old one are not reused
    from hf_camhd.optim import camhd

    monkeypatch.setattr(camhd, "NORMALIZED_HYPERGRAD_LR", 0.05)
    again = run_comparison(CompareConfig(**{**cfg, "optimizers": arms[:1]}), log=None)
    assert again.executed == ["adam-camhd-normalized|seed=0"]
    assert again.results["runs"][0]["optimizer"]["settings"]["hypergrad_lr"] == 0.05


def test_readme_settings_of_the_learning_rate_free_arms():
    digits, resnet = get_task("mlp-digits"), get_task("resnet18-cifar10")
    kw = arm_hyperparameters(resolve_arm("schedulefree-adamw"), digits)
    assert kw == {"lr": 0.0025, "weight_decay": digits.adamw_weight_decay, "warmup_fraction": SCHEDULE_FREE_WARMUP}
    opt = build_optimizer(resolve_arm("schedulefree-adamw"), torch.nn.Linear(3, 2), kw, total_steps=460)
    assert opt.defaults["warmup_steps"] == 23  # 5 % of the run
    with pytest.raises(ValueError, match="needs total_steps"):
        build_optimizer(resolve_arm("sfadamw-camhd"), torch.nn.Linear(3, 2),
                        arm_hyperparameters(resolve_arm("sfadamw-camhd"), digits))
    # Prodigy's safeguard_warmup and D-Adaptation follow the task's schedule; Schedule-Free and DoG never do
    assert arm_hyperparameters(resolve_arm("prodigy"), resnet)["safeguard_warmup"] is True
    assert [uses_schedule(resolve_arm(a), resnet) for a in ("prodigy", "dadapt-adam", "schedulefree-adamw", "dog",
                                                             "sfadamw-camhd", "adam", "sgdn")] == [
        True, True, False, False, False, False, True]
    # DoG's reps_rel: 1e-6, or 1e-4 with batch norm (the README's advice)
    assert arm_hyperparameters(resolve_arm("dog"), digits)["reps_rel"] == 1e-6
    assert arm_hyperparameters(resolve_arm("ldog"), resnet)["reps_rel"] == 1e-4
    assert resolve_arm("adam-camhd-3level-normalized").display_name == "Adam-CAM-HD (3-level, normalized)"
    assert resolve_arm("sfadamw-camhd-normalized").name == "sfadamw-camhd"


# ------------------------------------------------------------------------------------------------ train / eval switch
@pytest.mark.parametrize("arm", ["schedulefree-adamw", "sfadamw-camhd"])
def test_schedule_free_is_switched_to_eval_for_every_evaluation_and_checkpoint(arm, tmp_path, monkeypatch):
    built, events = [], []
    real_build, real_evaluate, real_save = (runner_module.build_optimizer, runner_module._evaluate,
                                            runner_module._save_run_checkpoint)

    def build(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    def modes() -> set:
        return {g["train_mode"] for g in built[-1].param_groups}

    def evaluate(*args):
        events.append(("evaluate", modes()))
        return real_evaluate(*args)

    def save(*args, **kwargs):
        events.append(("checkpoint", modes()))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(runner_module, "build_optimizer", build)
    monkeypatch.setattr(runner_module, "_evaluate", evaluate)
    monkeypatch.setattr(runner_module, "_save_run_checkpoint", save)
    cfg = dict(TINY, optimizers=(arm,), epochs=3, keep_checkpoints=True)
    switched = run_comparison(CompareConfig(**cfg, output_dir=str(tmp_path / "a")), log=None).results["runs"][0]
    # every evaluation and checkpoint saw the optimizer in eval mode (steps in eval mode would have raised)
    assert events == [("evaluate", {False}), ("checkpoint", {False})] * 3

    # without the switch (evaluating at y, the point it trains at) the numbers differ
    monkeypatch.setattr(runner_module, "_eval_mode", lambda opt: None)
    plain = run_comparison(CompareConfig(**cfg, output_dir=str(tmp_path / "b")), log=None).results["runs"][0]
    assert plain["epochs"][0]["train_loss"] == switched["epochs"][0]["train_loss"]  # same training up to there
    for a, b in zip(switched["epochs"], plain["epochs"]):
        assert abs(a["test_loss"] - b["test_loss"]) > 1e-3 * a["test_loss"], (a["test_loss"], b["test_loss"])


def _test_loss(state_dict: dict, tmp_cfg: CompareConfig) -> float:
    preset = runner_module.resolve_task(tmp_cfg)
    _, _, xt, yt, info, _ = runner_module.load_data(preset, tmp_cfg)
    model = build_model(preset.model, info, preset.model_kwargs)
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(logits_of(model(xt)).float(), yt, reduction="sum").double()) / yt.shape[0]


@pytest.mark.parametrize("arm", ["dog", "ldog"])
def test_dog_is_evaluated_on_its_averaged_weights(arm, tmp_path):
    # 60 steps: DoG's first steps are tiny by design (reps_rel), so a shorter run barely leaves its start
    cfg = CompareConfig(**dict(TINY, optimizers=(arm,), epochs=3, batch_size=16, max_train_samples=320,
                               keep_checkpoints=True), output_dir=str(tmp_path))
    run = run_comparison(cfg, log=None).results["runs"][0]
    state = torch.load(checkpoint_path(tmp_path, f"{arm}|seed=0"), weights_only=True)
    assert state["averager"]["t"] == run["steps_per_epoch"] * 3 + 1  # averaged after every step
    averaged, base = _test_loss(state["averager"]["av_model"], cfg), _test_loss(state["model"], cfg)
    assert run["final"]["test_loss"] == pytest.approx(averaged, rel=1e-9)
    # the averaged model, not the trained iterate, is what is reported (they differ 100x more than the match above)
    assert abs(averaged - base) > 1e-5 * base


def test_a_missing_package_is_one_usage_error(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "schedulefree", None)  # as if `pip install hf_camhd` without the extra
    rc = main(["compare", "--optimizers", "adam,schedulefree-adamw", "--output-dir", str(tmp_path / "o"),
               "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == ["hf-camhd: error: the schedulefree-adamw arm of hf-camhd compare needs "
                                        "schedulefree, which is not installed: pip install 'hf_camhd[experiments]'"]
    assert not (tmp_path / "o").exists()  # nothing was started


def test_d_adaptation_and_dog_learn_over_a_longer_run(tmp_path):
    # 300 steps: at its README's reps_rel, DoG's step size needs ~150 of them to grow from 1e-5 to ~0.2 on this MLP
    cfg = CompareConfig(**dict(TINY, optimizers=("dadapt-adam", "dog", "ldog"), epochs=15, batch_size=16,
                               max_train_samples=320), output_dir=str(tmp_path))
    for run in run_comparison(cfg, log=None).results["runs"]:
        assert not run["diverged"], run["key"]
        assert run["final"]["test_loss"] < 0.5 and run["final"]["test_accuracy"] > 85, (run["key"], run["final"])
        first, last = run["epochs"][0]["adapted_lr"], run["epochs"][-1]["adapted_lr"]
        if run["arm"] == "dadapt-adam":  # d grew from d₀ = 1e-6 within the first epoch
            assert first > 100 * 1e-6, (run["key"], first)
        else:  # DoG's η grew from its tiny first steps
            assert last > 100 * first, (run["key"], first, last)


def test_batch_norm_statistics_are_recomputed_at_the_evaluated_point():
    """Schedule-Free's README: after optimizer.eval(), run up to 50 training batches in train mode so batch norm's
    statistics are those of x, not of the training point y."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6, momentum=None))  # exact running mean
    x = torch.randn(64, 4)
    loader = [{"pixel_values": x[i:i + 8]} for i in range(0, 64, 8)]
    opt = build_optimizer(resolve_arm("schedulefree-adamw"), model, {"lr": 0.05, "warmup_fraction": 0.0}, total_steps=1)
    opt.train()
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        at_y = torch.stack([model[0](b["pixel_values"]).mean(0) for b in loader]).mean(0)
        opt.eval()
        at_x = torch.stack([model[0](b["pixel_values"]).mean(0) for b in loader]).mean(0)
    assert not torch.allclose(at_x, at_y, atol=1e-3)  # the two points' statistics differ
    model[1].reset_running_stats()  # note: momentum=None averages every batch seen; start the count here
    runner_module._refresh_batch_norm(model, loader, max_batches=50)
    assert not model.training
    assert torch.allclose(model[1].running_mean, at_x, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 8
    runner_module._refresh_batch_norm(model, loader, max_batches=3)  # at most max_batches batches
    assert int(model[1].num_batches_tracked) == 8 + 3


def test_the_runner_refreshes_batch_norm_only_for_schedule_free_models_with_it(tmp_path, monkeypatch):
    calls = []
    real = runner_module._refresh_batch_norm
    monkeypatch.setattr(runner_module, "_refresh_batch_norm", lambda model, loader: calls.append(
        type(model).__name__) or real(model, loader))
    cfg = dict(TINY, epochs=1, batch_size=32, max_train_samples=64, max_test_samples=64)
    run_comparison(CompareConfig(**cfg, model="resnet18", optimizers=("schedulefree-adamw", "adam"),
                                 output_dir=str(tmp_path / "rn")), log=None)
    assert calls == ["ResNet"]  # Schedule-Free on a batch-norm model, once per evaluation; Adam never
    run_comparison(CompareConfig(**cfg, optimizers=("schedulefree-adamw",), output_dir=str(tmp_path / "mlp")),
                   log=None)
    assert calls == ["ResNet"]  # the MLP has no batch norm
