"""Kill and resume: every long-running tool, SIGKILLed at random moments and inside its saves, resumes to the
uninterrupted result — bitwise on CPU for parameters and optimizer state, identical numbers in its results.

Each tool runs as a subprocess through ``tests/kill_workers/launch.py``, which makes the process SIGKILL
itself at a planned point: after the N-th optimizer step, half-way through the N-th ``torch.save`` (a torn
write), or just before the N-th call of a function in the save path. The N are drawn from a seeded RNG;
one kill per tool is at a random wall-clock moment instead (shortly after the first checkpoint appears).
After every kill the tool is started again with the *same* command line (its own resume flag), and after
the last kill it runs to the end. The result is compared with an uninterrupted run of the same command.

The random wall-clock kill comes first and lands at a random fraction (10–50 %) of the time the
uninterrupted run took from its first checkpoint to its last, so at least half of the training is left for
the planned kills that follow, on a slow machine or a fast one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = [sys.executable, str(ROOT / "tests" / "kill_workers" / "launch.py")]
TIMEOUT_S = 300


def _env(plan: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    env.pop("CAMHD_KILL", None)
    if plan:
        env["CAMHD_KILL"] = plan
    return env


class Result:
    def __init__(self, returncode: int, output: str, span_s: float | None):
        self.returncode, self.output, self.span_s = returncode, output, span_s


def _run(cmd: list[str], plan: str | None = None, watch: Path | None = None, kill_at: float | None = None,
         until: Path | None = None) -> Result:
    """Run ``cmd``; with ``plan`` the process kills itself there. With ``watch`` and ``until``, ``span_s`` is
    the time from the first path's appearance to the second's; with ``watch`` and ``kill_at`` the test
    SIGKILLs the process ``kill_at`` seconds after ``watch`` appears."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(plan), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)  # never block on a full pipe
    reader.start()
    deadline = time.monotonic() + TIMEOUT_S
    seen = span = None
    while proc.poll() is None and time.monotonic() < deadline:
        if watch is not None and seen is None and watch.exists():
            seen = time.monotonic()
        if until is not None and seen is not None and span is None and until.exists():
            span = time.monotonic() - seen
        if seen is not None and kill_at is not None and time.monotonic() >= seen + kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    if proc.poll() is None and time.monotonic() >= deadline:  # pragma: no cover - a hang: leave nothing behind
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join()
    out = "".join(chunks)
    assert time.monotonic() < deadline, f"{cmd} timed out:\n{out[-6000:]}"
    return Result(proc.returncode, out, span)


def _chain(cmd: list[str], kills: list[dict]) -> list[str]:
    """Start ``cmd`` once per planned kill (asserting that it died there), then once more to the end.
    Returns the output of every start."""
    outputs = []
    for kill in kills:
        r = _run(cmd, **kill)
        assert r.returncode == -signal.SIGKILL, f"planned kill {kill} did not happen (exit {r.returncode}):\n" \
                                                f"{r.output[-6000:]}"
        assert "Traceback" not in r.output, r.output[-6000:]
        outputs.append(r.output)
    r = _run(cmd)
    assert r.returncode == 0 and "Traceback" not in r.output, r.output[-6000:]
    return outputs + [r.output]


def _reference(cmd: list[str], watch: Path, until: Path) -> float:
    """Run ``cmd`` uninterrupted; returns how long it trained from its first checkpoint (``watch``) to its
    last (``until``)."""
    r = _run(cmd, watch=watch, until=until)
    assert r.returncode == 0, r.output[-6000:]
    assert r.span_s is not None, f"{watch} or {until} never appeared"
    return r.span_s


def assert_same(a, b, where: str = "") -> None:
    """Equal nested structures; tensors bitwise (``torch.equal``, same dtype and shape)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here


def _drop(obj, keys: set[str]):
    """``obj`` without the given keys at any depth (wall-clock times and other per-process values)."""
    if isinstance(obj, dict):
        return {k: _drop(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_drop(v, keys) for v in obj]
    return obj


def _no_leftovers(folder: Path) -> None:
    from hf_camhd.files import is_leftover

    left = [str(p) for p in folder.rglob("*") if is_leftover(p)]
    assert not left, left


def _load_torch(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ------------------------------------------------------------------------------------------------ compare
COMPARE = ["--module", "hf_camhd.cli", "compare", "--optimizers", "adam-camhd,sgdn-camhd", "--seeds", "2",
           "--epochs", "4", "--batch-size", "32", "--max-train-samples", "256", "--max-test-samples", "120",
           "--log-every", "3", "--no-progress", "--keep-checkpoints"]


def test_compare_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    rng = random.Random(1201)
    ref, out = tmp_path / "reference", tmp_path / "killed"
    span = _reference(LAUNCH + COMPARE + ["--output-dir", str(ref)], ref / "checkpoints",
                      ref / "checkpoints" / "sgdn-camhd__seed=1.pt")
    # 4 runs x 4 epochs x 8 steps = 128; a checkpoint and a results.json write (2 os.replace) per epoch; after
    # the first kill at most 64 steps are done, and the later kills need at most 12 + 8 + 16 + 12 more
    kills = [
        {"watch": out / "checkpoints", "kill_at": rng.uniform(0.1, 0.5) * span},     # a random moment
        {"plan": f"step:{rng.randint(2, 12)}"},                                     # between two steps
        {"plan": f"torn:{rng.randint(1, 2)}"},                                      # inside a checkpoint's write
        {"plan": f"before:os:replace:{rng.randint(2, 4)}"},                         # a finished temp file, not renamed
        {"plan": f"step:{rng.randint(4, 12)}"},
        {"plan": "before:matplotlib.figure:Figure.savefig:2"},                      # while writing the plots
    ]
    outputs = _chain(LAUNCH + COMPARE + ["--output-dir", str(out)], kills)
    assert any("left by an interrupted write" in o for o in outputs)  # the torn / unrenamed files were found
    assert any("continuing after epoch" in o for o in outputs)  # a run resumed in the middle, not from scratch

    timing = {"wall_time_s", "started_at", "finished_at", "environment", "output_dir", "command", "plots"}
    a = json.loads((ref / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in b["runs"]] == ["finished"] * 4
    assert_same(_drop(a, timing), _drop(b, timing), "results.json")
    for r in a["runs"]:
        name = r["key"].replace("|", "__") + ".pt"
        x, y = _load_torch(ref / "checkpoints" / name), _load_torch(out / "checkpoints" / name)
        assert x["epoch"] == 4
        for part in ("model", "optimizer", "shuffle_generator", "transform_generators", "torch_rng"):
            assert_same(x[part], y[part], f"{name}:{part}")
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md", "learning_curves.png",
                                                "gamma_trajectories.png"}
    _no_leftovers(out)


# ------------------------------------------------------------------------------------------------ accelerate script
IMAGE = ["--script", "scripts/train_image_classifier.py", "--model", "lenet5", "--dataset", "digits", "--no_hub",
         "--max_samples", "256", "--batch_size", "32", "--epochs", "5", "--optimizer", "adam-camhd",
         "--levels", "global,block,layer,unit", "--lr", "2e-3", "--hypergrad_lr", "1e-6", "--gamma_lr", "0.05",
         "--lr_schedule", "cosine", "--cpu", "--no_progress", "--log_every", "4", "--checkpointing_steps", "4",
         "--resume_from_checkpoint", "latest"]


def _compare_image_runs(ref: Path, out: Path) -> None:
    from safetensors.torch import load_file

    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert_same(_drop(a, {"args"}), _drop(b, {"args"}), "metrics.json")
    assert_same(load_file(ref / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors"), "model")
    steps = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == steps
    for step in steps:
        x, y = ref / "checkpoints" / step, out / "checkpoints" / step
        assert_same(_load_torch(x / "optimizer.bin"), _load_torch(y / "optimizer.bin"), f"{step}/optimizer.bin")
        assert_same(load_file(x / "model.safetensors"), load_file(y / "model.safetensors"), f"{step}/model")
        assert_same(json.loads((x / "progress.json").read_text()), json.loads((y / "progress.json").read_text()),
                    f"{step}/progress.json")
    _no_leftovers(out)


def test_image_script_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    rng = random.Random(1202)
    ref, out = tmp_path / "reference", tmp_path / "killed"
    span = _reference(LAUNCH + IMAGE + ["--output_dir", str(ref)], ref / "checkpoints" / "step_4",
                      ref / "checkpoints" / "step_40")
    # 40 steps, checkpoints at 4, 8 (end of epoch 1), ..., 40; save_state does 3 torch.save calls; after the
    # first kill at most step 22 is done, and the later kills need at most 7 + 9 more
    kills = [
        {"watch": out / "checkpoints" / "step_4", "kill_at": rng.uniform(0.1, 0.5) * span},
        {"plan": f"torn:{rng.randint(1, 3)}"},                     # inside accelerator.save_state
        {"plan": "before:hf_camhd.files:commit_dir:1"},            # a whole checkpoint folder, not renamed
        {"plan": f"step:{rng.randint(1, 7)}"},
        {"plan": f"step:{rng.randint(4, 9)}"},
        {"plan": "before:accelerate:Accelerator.save_model:1"},   # trained to the end, killed before the model
    ]
    outputs = _chain(LAUNCH + IMAGE + ["--output_dir", str(out)], kills)
    assert any("left by an interrupted write" in o for o in outputs)
    _compare_image_runs(ref, out)


def test_image_script_under_torchrun_killed_and_resumed(tmp_path):
    """Two processes (gloo): both die at the same step; the checkpoint every process wrote into resumes both."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(ROOT / "tests" / "kill_workers" / "launch.py")]
    args = [a for a in IMAGE if a not in ("--cpu",)] + ["--epochs", "2"]
    ref, out = tmp_path / "reference", tmp_path / "killed"
    r = _run(torchrun + args + ["--output_dir", str(ref)])
    assert r.returncode == 0, r.output[-6000:]
    r = _run(torchrun + args + ["--output_dir", str(out)], plan="torn:4")  # rank 0: inside the 2nd save_state
    assert r.returncode != 0 and {p.name for p in (out / "checkpoints").iterdir()} == {"step_4", ".step_8.partial"}, \
        r.output[-6000:]
    r = _run(torchrun + args + ["--output_dir", str(out)])
    assert r.returncode == 0 and "resumed from" in r.output, r.output[-6000:]
    _compare_image_runs(ref, out)


# ------------------------------------------------------------------------------------------------ Trainer script
FINETUNE = ["--script", "scripts/finetune_transformer.py", "--tiny", "--max_steps", "48", "--save_steps", "8",
            "--logging_steps", "4", "--eval_strategy", "steps", "--eval_steps", "16", "--per_device_train_batch_size",
            "8", "--optimizer", "adamw-camhd", "--levels", "global,block,layer", "--lr", "3e-3", "--hypergrad_lr",
            "1e-6", "--gamma_lr", "0.05", "--use_cpu", "--disable_tqdm", "--seed", "7",
            "--resume_from_checkpoint", "latest"]
# note: the Trainer's `train` metrics cover the steps of the last train() call only (transformers'
# _finalize_training), and runtimes are wall-clock: everything else must be identical
_SESSION = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos",
            "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def test_finetune_script_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    from safetensors.torch import load_file

    rng = random.Random(1203)
    ref, out = tmp_path / "reference", tmp_path / "killed"
    span = _reference(LAUNCH + FINETUNE + ["--output_dir", str(ref)], ref / "checkpoint-8" / "trainer_state.json",
                      ref / "checkpoint-48" / "trainer_state.json")
    # 48 steps, checkpoints at 8, 16, ..., 48; a checkpoint does 4 torch.save calls (training_args.bin first);
    # after the first kill at most step 28 is done, and the later kills need at most 8 + 8 more
    kills = [
        {"watch": out / "checkpoint-8" / "trainer_state.json", "kill_at": rng.uniform(0.1, 0.5) * span},
        {"plan": f"torn:{rng.randint(2, 4)}"},                                       # optimizer / scheduler / RNG file torn
        {"plan": "before:transformers.trainer_callback:TrainerState.save_to_json:1"},  # all but trainer_state.json
        {"plan": f"step:{rng.randint(1, 8)}"},
        {"plan": f"step:{rng.randint(3, 8)}"},
        {"plan": "before:hf_camhd.integrations.transformers:fix_model_card:1"},     # trained to the end
    ]
    outputs = _chain(LAUNCH + FINETUNE + ["--output_dir", str(out)], kills)
    assert any("it has no trainer_state.json" in o for o in outputs)  # the half-saved checkpoints were found

    assert_same(load_file(ref / "model.safetensors"), load_file(out / "model.safetensors"), "model")
    steps = sorted(p.name for p in ref.glob("checkpoint-*"))
    assert steps == sorted(p.name for p in out.glob("checkpoint-*")) == sorted(f"checkpoint-{s}" for s in
                                                                               range(8, 49, 8))
    for step in steps:
        assert_same(torch.load(ref / step / "optimizer.pt", weights_only=True),
                    torch.load(out / step / "optimizer.pt", weights_only=True), f"{step}/optimizer.pt")
        assert_same(load_file(ref / step / "model.safetensors"), load_file(out / step / "model.safetensors"), step)
    a = json.loads((ref / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert b["global_step"] == 48 and "eval_accuracy" in b["eval"]
    assert_same(_drop(a, _SESSION), _drop(b, _SESSION), "metrics.json")
    assert "CAMHDAdamW (CAM-HD" in (out / "README.md").read_text()
