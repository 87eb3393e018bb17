"""hf-camhd compare --push-to-hub: the best seed of the chosen arm becomes a Hub-ready folder and one upload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from hf_camhd.cli import main as cli_main
from hf_camhd.experiments import CompareConfig, run_comparison
from hf_camhd.models import MLP

MICRO = dict(task="mlp-digits", optimizers=("adam", "adam-camhd"), seeds=2, epochs=1, max_train_samples=200,
             log_every=2, progress=False)


@pytest.fixture
def recorded_hub(monkeypatch):
    """Contract test double (no network here): record create_repo / upload_folder and the files at call time."""
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw.get("repo_type")))

        class Url(str):
            pass
        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, **kw):
        files = {str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()}
        calls.append(("upload_folder", repo_id, repo_type, files))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return calls


def test_compare_publishes_the_best_seed_of_the_camhd_arm(tmp_path, recorded_hub):
    summary = run_comparison(CompareConfig(**MICRO, output_dir=str(tmp_path), push_to_hub=True,
                                           hub_model_id="me/mlp-digits", hub_token="hf_x"), log=None)
    assert summary.hub["pushed"] is True
    runs = [r for r in summary.results["runs"] if r["arm"] == "adam-camhd"]
    best = max(runs, key=lambda r: r["final"]["test_accuracy"])
    assert summary.hub["run"] == best["key"]
    assert [c[0] for c in recorded_hub] == ["create_repo", "upload_folder"]
    assert recorded_hub[0][1:] == ("me/mlp-digits", "model")
    assert {"README.md", "model.safetensors", "config.json", "camhd_config.json",
            "plots/learning_curves.png", "plots/gamma_trajectories.png"} <= recorded_hub[1][3]
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    accuracy = {r.metric_type: r.metric_value for r in card.data.eval_results}["accuracy"]
    assert accuracy == pytest.approx(best["final"]["test_accuracy"] / 100)
    # the model-index carries the evaluate module's name and value, as results.json records them
    assert best["final"]["test_metrics"] == {"accuracy": accuracy}
    # the published weights are the best run's: they reproduce its test accuracy
    model = MLP.from_pretrained(tmp_path / "hub", strict=True)
    from hf_camhd.data import as_tensors, load_image_dataset

    xt, yt = as_tensors(load_image_dataset("digits", split="test"))
    with torch.no_grad():
        acc = (model(pixel_values=xt).logits.argmax(-1) == yt).double().mean().item() * 100
    assert acc == pytest.approx(best["final"]["test_accuracy"], abs=1e-9)
    config = json.loads((tmp_path / "hub" / "camhd_config.json").read_text())
    assert config["optimizer"]["levels"] == ["global", "layer"]


def test_cli_push_without_network_says_so_and_keeps_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    rc = cli_main(["compare", "--optimizers", "adam-camhd", "--seeds", "1", "--epochs", "1", "--max-train-samples",
                   "100", "--no-progress", "--no-plots", "--output-dir", str(tmp_path), "--push-to-hub",
                   "--hub-model-id", "me/x"])
    assert rc == 1
    assert "nothing was uploaded" in capsys.readouterr().out
    assert (tmp_path / "hub" / "model.safetensors").is_file()


def test_push_needs_a_repo_id_and_a_known_arm(tmp_path):
    with pytest.raises(ValueError, match="--push-to-hub needs --hub-model-id"):
        CompareConfig(**MICRO, push_to_hub=True)
    with pytest.raises(ValueError, match="Invalid hub_optimizer 'sgd'"):
        run_comparison(CompareConfig(**MICRO, output_dir=str(tmp_path), push_to_hub=True, hub_model_id="me/x",
                                     hub_optimizer="sgd"), log=None)
