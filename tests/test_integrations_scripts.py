"""The training scripts: scripts/train_image_classifier.py (accelerate) and scripts/finetune_transformer.py (Trainer).

Run in-process on the CPU with tiny settings; each script's ``main(argv)`` returns its final metrics.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


IMAGE_ARGS = ["--model", "lenet5", "--dataset", "digits", "--no_hub", "--max_samples", "256", "--batch_size", "32",
              "--epochs", "2", "--optimizer", "adam-camhd", "--levels", "global,block,layer,unit", "--lr", "2e-3",
              "--hypergrad_lr", "0.01", "--gamma_lr", "0.05", "--lr_schedule", "cosine", "--cpu", "--no_progress",
              "--log_every", "4"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    out = tmp_path_factory.mktemp("img") / "full"
    result = _script("train_image_classifier").main(IMAGE_ARGS + ["--output_dir", str(out),
                                                                  "--checkpointing_steps", "4"])
    return out, result


def test_image_script_trains_evaluates_and_writes_metrics(image_run):
    out, result = image_run
    assert result["global_step"] == 16 and result["epochs"] == 2  # 256 / 32 = 8 steps per epoch
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert 0.0 <= result["final_eval"]["accuracy"] <= 1.0 and result["final_eval"]["examples"] > 0
    assert result["levels"] == ["global", "block", "layer", "unit"]
    assert {"camhd/gamma_unit", "camhd/alpha_unit_max", "camhd/effective_lr_mean"} <= result["camhd"].keys()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["final_eval"] == result["final_eval"] and saved["camhd"] == result["camhd"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_12", "step_16", "step_4", "step_8"]


@pytest.mark.parametrize("step", [4, 8], ids=["mid-epoch", "end-of-epoch"])
def test_image_script_resume_continues_exactly(image_run, tmp_path, step):
    full_dir, full = image_run
    out = tmp_path / "resumed"
    resumed = _script("train_image_classifier").main(
        IMAGE_ARGS + ["--output_dir", str(out),
                      "--resume_from_checkpoint", str(full_dir / "checkpoints" / f"step_{step}")])
    assert resumed["global_step"] == 16
    assert resumed["history"] == full["history"]
    assert resumed["camhd"] == full["camhd"]
    a, b = _weights(full_dir), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_image_script_timm_sgdn_accumulation_and_clipping(tmp_path):
    result = _script("train_image_classifier").main([
        "--model", "timm:test_efficientnet", "--dataset", "digits", "--no_hub", "--max_samples", "64", "--batch_size", "8",
        "--max_steps", "3", "--gradient_accumulation_steps", "2", "--max_grad_norm", "1.0",
        "--optimizer", "sgdn-camhd", "--levels", "global,block,layer", "--lr", "0.05", "--hypergrad_lr", "1e-4",
        "--cpu", "--no_progress", "--output_dir", str(tmp_path)])
    assert result["global_step"] == 3 and result["mixed_precision"] == "no"
    assert result["levels"] == ["global", "block", "layer"] and result["camhd"]
    assert (tmp_path / "metrics.json").exists()


def test_finetune_script_tiny_run_logs_camhd_and_cards_the_optimizer(tmp_path):
    result = _script("finetune_transformer").main([
        "--tiny", "--max_steps", "4", "--logging_steps", "2", "--eval_strategy", "no", "--save_steps", "2",
        "--per_device_train_batch_size", "8", "--optimizer", "adamw-camhd", "--levels", "global,block,layer",
        "--lr", "3e-3", "--hypergrad_lr", "0.01", "--gamma_lr", "0.05", "--use_cpu", "--disable_tqdm",
        "--output_dir", str(tmp_path)])
    assert result["global_step"] == 4 and result["levels"] == ["global", "block", "layer"]
    logs = [e for e in result["log_history"] if "loss" in e]
    assert len(logs) == 2 and all("camhd/gamma_block" in e for e in logs)
    card = (tmp_path / "README.md").read_text()
    assert "- optimizer: CAMHDAdamW (CAM-HD" in card and "adamw_torch" not in card
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "model.safetensors").exists()
    # and it resumes from its own checkpoint
    resumed = _script("finetune_transformer").main([
        "--tiny", "--max_steps", "4", "--logging_steps", "2", "--eval_strategy", "no", "--save_steps", "2",
        "--per_device_train_batch_size", "8", "--optimizer", "adamw-camhd", "--levels", "global,block,layer",
        "--lr", "3e-3", "--hypergrad_lr", "0.01", "--gamma_lr", "0.05", "--use_cpu", "--disable_tqdm",
        "--output_dir", str(tmp_path / "again"), "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")])
    assert resumed["global_step"] == 4
    assert resumed["camhd"] == result["camhd"]


def test_finetune_script_eval_metrics_come_from_the_evaluate_modules(tmp_path):
    """eval_accuracy / eval_f1 / eval_matthews_correlation (evaluate's names) equal scikit-learn's scores of the
    saved model's predictions on the validation split."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    script = _script("finetune_transformer")
    result = script.main([
        "--tiny", "--max_steps", "20", "--logging_steps", "10", "--eval_strategy", "steps", "--eval_steps", "10",
        "--save_steps", "100", "--per_device_train_batch_size", "16", "--optimizer", "adamw-camhd", "--lr", "3e-3",
        "--use_cpu", "--disable_tqdm", "--output_dir", str(tmp_path)])
    evals = [e for e in result["log_history"] if "eval_loss" in e]
    assert len(evals) == 3 and all({"eval_accuracy", "eval_f1", "eval_matthews_correlation"} <= e.keys()
                                   for e in evals)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    validation = script.synthetic_sentiment(128, 42 + 1)  # the script's validation split (seed 42 + 1)
    with torch.no_grad():
        logits = model(**tokenizer(list(validation["text"]), padding=True, return_tensors="pt")).logits
    predictions, labels = logits.argmax(-1).numpy(), np.array(list(validation["label"]))
    assert set(predictions.tolist()) == {0, 1}  # a model that learned something: both classes predicted
    final = result["eval"]
    assert final["eval_accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert final["eval_f1"] == pytest.approx(f1_score(labels, predictions), abs=1e-12)
    assert final["eval_matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, predictions), abs=1e-12)
