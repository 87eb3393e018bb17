"""--push_to_hub of the training scripts: the upload contract with HfApi patched (no network here), and the
clear message with the folder left in place when there is no way to upload."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from test_integrations_scripts import _script  # noqa: F401  (same loader as the script tests)


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture
def recorded_hub(monkeypatch):
    """Contract test double: HfApi.create_repo / upload_folder record their calls and the files at call time."""
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id))

        class Url(str):
            pass
        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, *, repo_id, folder_path, **kw):
        files = {str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()}
        calls.append(("upload_folder", repo_id, files))
        return "https://huggingface.co/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return calls


IMAGE = ["--model", "mlp", "--hidden_sizes", "32", "--dataset", "digits", "--no_hub", "--max_samples", "256",
         "--batch_size", "32", "--epochs", "2", "--optimizer", "adam-camhd", "--levels", "global,layer,parameter",
         "--cpu", "--no_progress", "--log_every", "2"]


def test_image_script_publishes_one_commit(tmp_path, recorded_hub):
    result = _script("train_image_classifier").main(IMAGE + ["--output_dir", str(tmp_path), "--push_to_hub",
                                                             "--hub_model_id", "me/mlp-digits", "--hub_token", "hf_x"])
    assert result["hub"]["pushed"] is True
    assert [c[0] for c in recorded_hub] == ["create_repo", "upload_folder"]
    files = recorded_hub[1][2]
    assert {"README.md", "model.safetensors", "config.json", "camhd_config.json", "plots/gamma.png",
            "plots/learning_curves.png"} <= files
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert "camhd" in card.data.tags and card.data.eval_results[0].metric_type == "accuracy"


def test_image_script_without_network_keeps_the_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    result = _script("train_image_classifier").main(IMAGE + ["--output_dir", str(tmp_path), "--push_to_hub",
                                                             "--hub_model_id", "me/mlp-digits"])
    assert result["hub"]["pushed"] is False
    assert "nothing was uploaded" in capsys.readouterr().err
    assert (tmp_path / "hub" / "model.safetensors").is_file()


def test_finetune_script_uses_the_trainers_push_with_the_camhd_card(tmp_path, recorded_hub):
    result = _script("finetune_transformer").main([
        "--tiny", "--max_steps", "2", "--logging_steps", "1", "--eval_strategy", "no", "--save_steps", "100",
        "--per_device_train_batch_size", "8", "--optimizer", "adam-camhd", "--use_cpu", "--disable_tqdm",
        "--output_dir", str(tmp_path), "--push_to_hub", "--hub_model_id", "me/tiny-bert", "--hub_token", "hf_x"])
    assert result["hub"]["pushed"] is True
    uploads = [c for c in recorded_hub if c[0] == "upload_folder"]
    assert len(uploads) == 1 and uploads[0][1] == "me/tiny-bert" and "README.md" in uploads[0][2]
    card = (tmp_path / "README.md").read_text()
    assert "- optimizer: CAMHDAdam (CAM-HD" in card and "### CAM-HD learned rates" in card
