"""hf-camhd compare: an interrupted run continues from its last epoch, and checkpoints do not outlive their run.

In-process and fast; tests/test_kill_resume.py does the same with real SIGKILLs."""

from __future__ import annotations

import pytest
import torch

from hf_camhd.experiments import CompareConfig, run_comparison
from hf_camhd.experiments import runner as runner_module
from hf_camhd.experiments.runner import checkpoint_path

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO = dict(task="mlp-digits", optimizers=("adam-camhd", "sgdn-camhd"), seeds=1, epochs=3, batch_size=32,
             max_train_samples=128, max_test_samples=64, log_every=2, progress=False, plots=False)


def _interrupt_at_write(monkeypatch, n: int) -> None:
    """Make the n-th write of results.json raise KeyboardInterrupt (a kill right after that epoch's checkpoint)."""
    real_save = runner_module.save_results
    calls = {"n": 0}

    def interrupted(path, data):
        calls["n"] += 1
        if calls["n"] == n:
            monkeypatch.setattr(runner_module, "save_results", real_save)  # the resumed run writes normally
            raise KeyboardInterrupt
        real_save(path, data)

    monkeypatch.setattr(runner_module, "save_results", interrupted)


def _same(a, b) -> bool:
    """Equal, tensors bitwise (and of the same dtype), through lists and dicts."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _numbers(results: dict) -> list:
    drop = {"wall_time_s", "started_at", "finished_at", "environment"}
    return [{k: v for k, v in r.items() if k not in drop} | {"epochs": [{k: v for k, v in e.items() if k != "wall_time_s"}
                                                                        for e in r["epochs"]]}
            for r in results["runs"]]


def test_checkpoints_are_deleted_when_their_run_finishes(tmp_path):
    run_comparison(CompareConfig(**MICRO, output_dir=str(tmp_path)), log=None)
    assert not any((tmp_path / "checkpoints").iterdir())


def test_an_interrupted_run_continues_from_its_last_epoch(tmp_path, monkeypatch):
    full = run_comparison(CompareConfig(**MICRO, output_dir=str(tmp_path / "full"), keep_checkpoints=True), log=None)

    _interrupt_at_write(monkeypatch, 5)  # run 2 (sgdn-camhd), after its first epoch and checkpoint
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_comparison(CompareConfig(**MICRO, output_dir=str(out), keep_checkpoints=True), log=None)
    assert torch.load(checkpoint_path(out, "sgdn-camhd|seed=0"), weights_only=True)["epoch"] == 1

    said = []
    resumed = run_comparison(CompareConfig(**MICRO, output_dir=str(out), keep_checkpoints=True), log=said.append)
    assert resumed.skipped == ["adam-camhd|seed=0"] and resumed.executed == ["sgdn-camhd|seed=0"]
    assert any("sgdn-camhd|seed=0: continuing after epoch 1" in line for line in said)
    assert _numbers(resumed.results) == _numbers(full.results)
    for key in ("adam-camhd|seed=0", "sgdn-camhd|seed=0"):
        a = torch.load(checkpoint_path(tmp_path / "full", key), weights_only=True)
        b = torch.load(checkpoint_path(out, key), weights_only=True)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for i, state in a["optimizer"]["state"].items():
            assert all(torch.equal(v, b["optimizer"]["state"][i][k]) for k, v in state.items()
                       if isinstance(v, torch.Tensor))


def test_no_resume_ignores_a_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    cfg = dict(MICRO, optimizers=("adam-camhd",), output_dir=str(out), keep_checkpoints=True)
    first = run_comparison(CompareConfig(**cfg), log=None)
    state = torch.load(checkpoint_path(out, "adam-camhd|seed=0"), weights_only=True)
    assert state["epoch"] == 3
    said = []
    again = run_comparison(CompareConfig(**cfg, resume=False), log=said.append)
    assert again.executed == ["adam-camhd|seed=0"] and not any("continuing" in line for line in said)
    assert _numbers(again.results) == _numbers(first.results)


@pytest.mark.parametrize("arm", ["schedulefree-adamw", "sfadamw-camhd", "dog", "prodigy"])
def test_train_eval_switching_and_averaged_arms_resume_bitwise(arm, tmp_path, monkeypatch):
    """Schedule-Free (checkpointed in eval mode, switched back on resume), DoG (its averager is in the checkpoint)
    and Prodigy (its estimate d lives in the param groups) continue exactly as if never stopped."""
    cfg = dict(MICRO, optimizers=(arm,), keep_checkpoints=True)
    full = run_comparison(CompareConfig(**cfg, output_dir=str(tmp_path / "full")), log=None)
    _interrupt_at_write(monkeypatch, 2)  # after epoch 2 and its checkpoint
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_comparison(CompareConfig(**cfg, output_dir=str(out)), log=None)
    said = []
    resumed = run_comparison(CompareConfig(**cfg, output_dir=str(out)), log=said.append)
    assert any(f"{arm}|seed=0: continuing after epoch 2" in line for line in said)
    assert _numbers(resumed.results) == _numbers(full.results)
    a = torch.load(checkpoint_path(tmp_path / "full", f"{arm}|seed=0"), weights_only=True)
    b = torch.load(checkpoint_path(out, f"{arm}|seed=0"), weights_only=True)
    for part in ("model", "optimizer", "averager"):
        assert _same(a[part], b[part]), part
    assert (a["averager"] is not None) == (arm == "dog")
