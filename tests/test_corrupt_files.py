"""A truncated or corrupted file the tools wrote earlier is one clear error naming the file and what to do.

results.json and a run's checkpoint (``hf-camhd compare``), an accelerate checkpoint
(``scripts/train_image_classifier.py``), a Trainer checkpoint (``scripts/finetune_transformer.py``), a kept
Hub candidate and a half-published Hub folder — never a traceback from inside json, zipfile or torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_camhd.cli import main as cli_main
from hf_camhd.files import CorruptFileError

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")

COMPARE = ["compare", "--optimizers", "adam-camhd", "--seeds", "1", "--epochs", "2", "--max-train-samples", "128",
           "--max-test-samples", "64", "--no-progress", "--no-plots", "--keep-checkpoints"]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    assert cli_main(COMPARE + ["--output-dir", str(out)]) == 0
    return out


def test_truncated_results_json_is_one_error_naming_it_and_the_fix(compared, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(compared, out)
    _truncate(out / "results.json")
    capsys.readouterr()
    assert cli_main(COMPARE + ["--output-dir", str(out)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"hf-camhd: error: results file '{out / 'results.json'}' is truncated or corrupted")
    assert "Delete it to rerun every run, or pass --no-resume" in line
    # the fix works: --no-resume reruns, and keeps the damaged file aside
    damaged = (out / "results.json").read_bytes()
    assert cli_main(COMPARE + ["--output-dir", str(out), "--no-resume"]) == 0
    assert (out / "results.previous.json").read_bytes() == damaged
    assert json.loads((out / "results.json").read_text())["runs"][0]["status"] == "finished"


def test_truncated_run_checkpoint_is_one_error_naming_it_and_the_fix(compared, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(compared, out)
    data = json.loads((out / "results.json").read_text())
    data["runs"][0]["status"] = "running"  # killed during the run: its checkpoint would be resumed
    (out / "results.json").write_text(json.dumps(data))
    ckpt = out / "checkpoints" / "adam-camhd__seed=0.pt"
    _truncate(ckpt)
    capsys.readouterr()
    assert cli_main(COMPARE + ["--output-dir", str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"Checkpoint of run adam-camhd|seed=0 '{ckpt}' is truncated or corrupted" in line
    assert "Delete it (the run then restarts from its first epoch), or pass --no-resume" in line
    ckpt.unlink()
    assert cli_main(COMPARE + ["--output-dir", str(out)]) == 0


def test_a_checkpoint_of_another_run_is_refused(compared, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(compared, out)
    data = json.loads((out / "results.json").read_text())
    data["runs"][0]["status"] = "running"
    (out / "results.json").write_text(json.dumps(data))
    torch.save({"format": 1, "key": "adam|seed=3"}, out / "checkpoints" / "adam-camhd__seed=0.pt")
    capsys.readouterr()
    assert cli_main(COMPARE + ["--output-dir", str(out)]) == 2
    assert "is not a checkpoint of run adam-camhd|seed=0" in _one_error_line(capsys)


def test_corrupted_hub_candidate_is_one_error(compared, tmp_path):
    from hf_camhd.data import dataset_info
    from hf_camhd.experiments.publish import publish_best, save_candidate
    from hf_camhd.models import MLP

    results = json.loads((compared / "results.json").read_text())
    model = MLP(input_size=64, hidden_sizes=[100, 100], num_classes=10)
    save_candidate(tmp_path, "adam-camhd|seed=0", model, torch.optim.Adam(model.parameters()))
    _truncate(tmp_path / "hub_candidates" / "adam-camhd|seed=0" / "model.safetensors")
    with pytest.raises(CorruptFileError, match=r"Saved weights of run adam-camhd\|seed=0 file '.*model\.safetensors' "
                                               r"is truncated .*Delete that folder and run the same comparison again"):
        publish_best(results, tmp_path, "adam-camhd", model, dataset_info("digits"), repo_id="me/x")


def test_half_published_folder_is_not_uploaded(tmp_path, monkeypatch):
    from hf_camhd.hub import PUBLISHING_MARKER, HubUploadError, publish, upload_folder
    from hf_camhd.models import MLP

    folder = publish(MLP(input_size=4, hidden_sizes=[3], num_classes=2), tmp_path / "hub", results={"accuracy": 0.5},
                     optimizer={"name": "adam"}, dataset="digits")
    assert not (folder / PUBLISHING_MARKER).exists() and (folder / "model.safetensors").is_file()
    (folder / PUBLISHING_MARKER).write_text("killed while publishing")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(HubUploadError, match=r"left half-written by an interrupted publish\(\).*Run publish\(\) again"):
        upload_folder(folder, "me/x", token="hf_x")


# ------------------------------------------------------------------------------------------------ scripts
def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGE = ["--model", "mlp", "--hidden_sizes", "16", "--dataset", "digits", "--no_hub", "--max_samples", "64",
         "--batch_size", "16", "--epochs", "1", "--cpu", "--no_progress", "--checkpointing_steps", "2"]


@pytest.fixture(scope="module")
def image_checkpoints(tmp_path_factory):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("image") / "run"
    _script("train_image_classifier").main(IMAGE + ["--output_dir", str(out)])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("damage, message", [
    ("optimizer.bin", r"Checkpoint file '.*step_4/optimizer\.bin' is truncated or corrupted \(not a complete "
                      r"torch\.save archive"),
    ("model.safetensors", r"Checkpoint file '.*step_4/model\.safetensors' is truncated or corrupted \(header declares"),
    ("progress.json", r"Checkpoint file '.*step_4/progress\.json' is truncated or corrupted \(not valid JSON"),
])
def test_image_script_damaged_checkpoint(image_checkpoints, tmp_path, damage, message):
    out = tmp_path / "run"
    shutil.copytree(image_checkpoints, out)
    _truncate(out / "checkpoints" / "step_4" / damage)
    with pytest.raises(CorruptFileError, match=message + r".*Delete that checkpoint folder \(--resume_from_checkpoint "
                                                         r"latest then takes the one before it\)"):
        _script("train_image_classifier").main(IMAGE + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_image_script_skips_a_checkpoint_an_old_version_left_incomplete(image_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(image_checkpoints, out)
    (out / "checkpoints" / "step_4" / "progress.json").unlink()
    result = _script("train_image_classifier").main(IMAGE + ["--output_dir", str(out), "--resume_from_checkpoint",
                                                             "latest"])
    printed = capsys.readouterr().out
    assert "skipping" in printed and "step_4: it has no progress.json" in printed and "resumed from" in printed
    assert result["global_step"] == 4


def test_image_script_damaged_checkpoint_exits_2_without_traceback(image_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(image_checkpoints, out)
    _truncate(out / "checkpoints" / "step_4" / "optimizer.bin")
    proc = subprocess.run([sys.executable, "scripts/train_image_classifier.py", *IMAGE, "--output_dir", str(out),
                           "--resume_from_checkpoint", "latest"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "train_image_classifier.py: error: Checkpoint file" in proc.stderr and "optimizer.bin" in proc.stderr


FINETUNE = ["--tiny", "--max_steps", "4", "--save_steps", "2", "--logging_steps", "2", "--eval_strategy", "no",
            "--per_device_train_batch_size", "8", "--use_cpu", "--disable_tqdm"]


@pytest.fixture(scope="module")
def trainer_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "run"
    _script("finetune_transformer").main(FINETUNE + ["--output_dir", str(out)])
    return out


@pytest.mark.parametrize("damage, message", [
    ("optimizer.pt", r"Trainer checkpoint file '.*checkpoint-4/optimizer\.pt' is truncated or corrupted"),
    ("rng_state.pth", r"Trainer checkpoint file '.*checkpoint-4/rng_state\.pth' is truncated or corrupted"),
    ("trainer_state.json", r"Trainer checkpoint file '.*checkpoint-4/trainer_state\.json' is truncated or corrupted"),
])
def test_finetune_script_damaged_checkpoint(trainer_checkpoints, tmp_path, damage, message):
    out = tmp_path / "run"
    shutil.copytree(trainer_checkpoints, out)
    _truncate(out / "checkpoint-4" / damage)
    with pytest.raises(CorruptFileError, match=message + r".*Delete that folder \(--resume_from_checkpoint latest then "
                                                         r"takes the one before it\), or start over"):
        _script("finetune_transformer").main(FINETUNE + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])


def test_finetune_script_removes_a_checkpoint_a_kill_left_half_saved(trainer_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(trainer_checkpoints, out)
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    result = _script("finetune_transformer").main(FINETUNE + ["--output_dir", str(out), "--resume_from_checkpoint",
                                                              "latest"])
    assert "removed" in capsys.readouterr().out
    assert result["global_step"] == 4 and (out / "checkpoint-4" / "trainer_state.json").is_file()
