"""``hf-camhd compare --push-to-hub``: publish the best seed of one optimizer arm with :func:`hf_camhd.hub.publish`.

While a comparison runs, every run of the chosen arm keeps its final weights and its optimizer summary
under ``OUTPUT_DIR/hub_candidates/<run key>/``; afterwards the run with the best final test accuracy is
rebuilt and written as a Hub-ready folder ``OUTPUT_DIR/hub`` (weights, CAM-HD card with the
comparison's plots, ``camhd_config.json``), then uploaded in one commit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..files import atomic_dir, check_files

CANDIDATES = "hub_candidates"


def default_hub_arm(arms: Sequence[str]) -> str:
    """The arm to publish when none is named: the first CAM-HD arm, else the first arm."""
    return next((a for a in arms if "camhd" in a), arms[0])


def candidate_dir(out_dir: Path, key: str) -> Path:
    return Path(out_dir) / CANDIDATES / key


def has_candidate(out_dir: Path, key: str) -> bool:
    d = candidate_dir(out_dir, key)
    return (d / "model.safetensors").is_file() and (d / "optimizer.json").is_file()


def save_candidate(out_dir: Path, key: str, model: nn.Module, optimizer: Any) -> None:
    """Keep a finished run's weights and optimizer summary for :func:`publish_best`."""
    from safetensors.torch import save_file

    from ..hub import summarize_optimizer

    with atomic_dir(candidate_dir(out_dir, key)) as d:  # note: weights and summary appear together or not at all
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
        (d / "optimizer.json").write_text(json.dumps(summarize_optimizer(optimizer), indent=1, default=str))


def publish_best(results: Mapping[str, Any], out_dir: Path, arm: str, model: nn.Module, info, *, repo_id: str,
                 private: bool = False, token: str | None = None) -> dict:
    """Publish the best finished run of ``arm`` (``model``: a fresh model of the task's architecture).

    Returns ``{"pushed": bool, "folder": ..., "run": key, ...}``; an upload that cannot happen (no token,
    no network) is reported in ``"error"`` and leaves the folder in place.
    """
    from safetensors.torch import load_file

    from ..hub import HubUploadError, publish

    runs = [r for r in results["runs"] if r.get("arm") == arm and r.get("status") == "finished"]
    if not runs:
        raise ValueError(f"Invalid hub optimizer {arm!r}: no finished run of it in this comparison")
    best = max(runs, key=lambda r: r["final"]["test_accuracy"])
    if not has_candidate(out_dir, best["key"]):
        raise ValueError(f"No saved weights for run {best['key']!r}; rerun the comparison with --push-to-hub")
    d = check_files(candidate_dir(out_dir, best["key"]), required=("model.safetensors", "optimizer.json"),
                    what=f"Saved weights of run {best['key']}",
                    fix="Delete that folder and run the same comparison again: the run is trained again to publish it.")
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    optimizer = json.loads((d / "optimizer.json").read_text())
    plots = {title: Path(out_dir) / name for title, name in (("Learning curves (all optimizers, mean ± s.e.)",
                                                              "learning_curves.png"),
                                                             ("γ trajectories", "gamma_trajectories.png"))
             if (Path(out_dir) / name).is_file()}
    final = best["final"]
    folder = Path(out_dir) / "hub"
    summary = {"folder": str(folder), "run": best["key"], "repo_id": repo_id,
               "test_accuracy": final["test_accuracy"]}
    try:
        # note: the evaluate module's names and values ({"accuracy": 0.91}); a run recorded before results kept
        # them has only the percentage
        scores = final.get("test_metrics") or {"accuracy": final["test_accuracy"] / 100.0}
        publish(model, folder, results={**scores, "loss": final["test_loss"]},
                optimizer=optimizer, dataset={"name": info.name, "id": info.hub_id},
                plots=plots, push=True, repo_id=repo_id, private=private, token=token,
                description=(f"`{type(model).__name__}` trained on {info.name} by `hf-camhd compare` (seed "
                             f"{best['seed']}, the best of {len(runs)} seeds of `{arm}`)."))
    except HubUploadError as err:
        return {**summary, "pushed": False, "error": str(err)}
    return {**summary, "pushed": True}
