"""Publishing: Hub-ready folders that load back, cards whose metadata reads back, and the upload contract."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from hf_camhd import CAMHDAdam
from hf_camhd.hub import HubUploadError, publish, summarize_optimizer, upload_folder
from hf_camhd.models import MLP, LeNet5

RESULTS = {"accuracy": 0.9125, "loss": 0.2875}


def _trained_optimizer(model, levels=("global", "layer")):
    opt = CAMHDAdam(model, levels=levels, hypergrad_lr=1e-6, hypergrad_rule="additive", gamma_lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        out = model(pixel_values=torch.randn(4, *_shape(model)), labels=torch.randint(0, 10, (4,)))
        out.loss.backward()
        opt.step()
    return opt


def _shape(model):
    cfg = model._hub_mixin_config
    return (cfg["in_channels"], cfg["image_size"], cfg["image_size"]) if "in_channels" in cfg else (cfg["input_size"],)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_lenet5_folder_round_trip_and_card_metadata(tmp_path, offline):
    torch.manual_seed(0)
    model = LeNet5(in_channels=1, image_size=28)
    opt = _trained_optimizer(model, ("global", "unit"))
    folder = publish(model, tmp_path / "lenet", results=RESULTS, optimizer=opt,
                     dataset="zalando-datasets/fashion_mnist", model_name="lenet5-fmnist-camhd")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    loaded = LeNet5.from_pretrained(folder, strict=True)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model.eval()(pixel_values=x).logits, loaded.eval()(pixel_values=x).logits)

    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert "camhd" in data.tags and data.library_name == "hf_camhd"
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    values = {r.metric_type: r.metric_value for r in data.eval_results}
    assert values == RESULTS
    assert "Adam-CAM-HD" in card.text and "| unit |" in card.text and "LeNet5.from_pretrained" in card.text
    config = json.loads((folder / "camhd_config.json").read_text())
    assert config["optimizer"]["levels"] == ["global", "unit"]
    assert config["optimizer"]["tree"]["levels"] == ["global", "unit"]
    assert abs(sum(r["gamma"] for r in config["optimizer"]["final"]) - 1) < 1e-6


def test_timm_folder_loads_with_timm(tmp_path, offline):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    opt = CAMHDAdam(model, levels=("global", "layer"))
    folder = publish(model, tmp_path / "timm", results={"accuracy": 0.5}, optimizer=opt, dataset="uoft-cs/cifar10")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded.eval()(x))
    card = ModelCard.load(folder / "README.md")
    assert "timm" in card.data.tags and 'timm.create_model("hf-hub:' in card.text


def test_transformers_folder_loads_with_auto_class(tmp_path, offline):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=32, num_labels=3))
    opt = CAMHDAdam(model, levels=("global", "layer"))
    folder = publish(model, tmp_path / "bert", results={"accuracy": 0.7}, optimizer=opt, dataset="glue",
                     task="text-classification")
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    ids = torch.randint(0, 50, (2, 7))
    assert torch.equal(model.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
    assert "AutoModelForSequenceClassification" in ModelCard.load(folder / "README.md").text


def test_upload_contract_one_commit(tmp_path, monkeypatch):
    """Contract test (no network here): with HfApi patched to record calls, push=True creates the repo
    and uploads the whole folder in exactly one commit."""
    from huggingface_hub import HfApi

    calls = []

    def fake_create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw.get("repo_type"), kw.get("private")))

        class Url(str):
            pass
        url = Url(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def fake_upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, **kw):
        files = sorted(str(p.relative_to(folder_path)) for p in __import__("pathlib").Path(folder_path).rglob("*")
                       if p.is_file())
        calls.append(("upload_folder", repo_id, repo_type, files, commit_message))
        return "https://huggingface.co/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    model = MLP(input_size=64, hidden_sizes=[16], num_classes=10)
    opt = _trained_optimizer(model)
    publish(model, tmp_path / "mlp", results=RESULTS, optimizer=opt, dataset="digits", push=True,
            repo_id="someone/mlp-digits-camhd", private=True, token="hf_fake", plots={"γ": _png(tmp_path)})
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1:] == ("someone/mlp-digits-camhd", "model", True)
    _, repo, repo_type, files, message = calls[1]
    assert repo == "someone/mlp-digits-camhd" and repo_type == "model"
    assert {"README.md", "config.json", "model.safetensors", "camhd_config.json", "plots/gamma.png"} <= set(files)
    assert "CAM-HD" in message


def _png(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0.5, 0.6])
    path = tmp_path / "gamma.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def test_no_token_or_offline_gives_a_clear_message_and_keeps_the_folder(tmp_path, monkeypatch):
    model = MLP(input_size=64, hidden_sizes=[8], num_classes=10)
    folder = publish(model, tmp_path / "out", results=RESULTS, optimizer={"name": "adam"}, dataset="digits")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(HubUploadError, match="HF_HUB_OFFLINE is set.*Hub-ready folder is at"):
        upload_folder(folder, "me/x")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(HubUploadError, match="No Hugging Face token"):
        upload_folder(folder, "me/x")
    assert (folder / "model.safetensors").is_file()


def test_summaries_and_bad_input():
    model = MLP(input_size=4, hidden_sizes=[3], num_classes=2)
    s = summarize_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
    assert s["name"] == "Adam" and s["settings"]["lr"] == 1e-3
    with pytest.raises(ValueError, match="needs at least a 'name'"):
        summarize_optimizer({"lr": 1})
    with pytest.raises(ValueError, match="not an hf_camhd model, a timm model or a transformers model"):
        publish(torch.nn.Linear(2, 2), "/tmp/unused", results={}, optimizer={"name": "x"}, dataset="d")
    with pytest.raises(ValueError, match="push=True needs repo_id"):
        publish(model, "/tmp/unused", results={}, optimizer={"name": "x"}, dataset="d", push=True)


def test_committed_example_card_reads_back():
    """docs/examples holds a card rendered from a real `hf-camhd compare` run on digits."""
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "docs" / "examples" / "mlp-digits-adam-camhd"
    card = ModelCard.load(folder / "README.md")
    assert "camhd" in card.data.tags and card.data.datasets == ["digits"]
    accuracy = {r.metric_type: r.metric_value for r in card.data.eval_results}["accuracy"]
    assert 0.5 < accuracy <= 1.0
    assert "Adam-CAM-HD" in card.text and (folder / "plots" / "gamma_trajectories.png").is_file()
    assert json.loads((folder / "camhd_config.json").read_text())["optimizer"]["name"] == "adam-camhd"
