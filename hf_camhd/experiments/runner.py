"""The comparison runner: plan (arms × seeds, fixed γ × seeds or rule × β × seeds), train and evaluate each run,
record, resume.

One run = one arm × one seed: the seed fixes the model's initialisation and the data order (so every
arm of a seed starts from the same weights and sees the same batches). Training goes through
:class:`accelerate.Accelerator` (``cpu=True`` on CPU), so the same code runs single-process, under
``torchrun`` / ``accelerate launch`` (DDP, one global batch split over the processes) and in mixed
precision. ``results.json`` is rewritten (atomically) after every epoch, and the run's state — model,
optimizer, scheduler, data-order and augmentation generators — goes to ``checkpoints/<run>.pt``; on
resume, finished runs whose key and configuration hash match are skipped and an unfinished one continues
from its last finished epoch, bitwise as if it had never stopped (CPU). Leftovers of a write a kill
interrupted are removed at the next start, and a truncated or corrupted ``results.json`` or checkpoint is
one clear error naming the file.

Example:
    >>> from hf_camhd.experiments import CompareConfig, run_comparison
    >>> summary = run_comparison(CompareConfig(epochs=1, seeds=1, max_train_samples=200, progress=False,
    ...                                        output_dir="/tmp/hf-camhd-doctest", plots=False), log=None)
    >>> sorted(r["arm"] for r in summary.results["runs"])
    ['adam', 'adam-camhd', 'adam-camhd-normalized', 'adam-hd']
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from .._extras import require

for _package in ("accelerate", "datasets", "evaluate", "tqdm", "matplotlib", "sklearn"):
    require("hf-camhd compare", _package, extra="experiments")

from ..baselines import requires_loss  # noqa: E402
from ..data import TensorImageDataset, as_tensors, dataset_info, load_image_dataset, train_transform  # noqa: E402
from ..files import CorruptFileError, atomic_path, atomic_write, check_file, recover_leftovers  # noqa: E402
from ..metrics import load as load_metric  # noqa: E402
from ..optim._state import NORMALIZED_HYPERGRAD_LR_BOUND  # noqa: E402
from .arms import CAMHD_BASES, Arm, arm_hyperparameters, build_optimizer, resolve_arm, uses_schedule
from .models import build_model, logits_of
from .presets import DEFAULT_TASK, SWEEP_GAMMAS, TaskPreset, get_task, sweep_hypergrad_lrs
from .results import (
    SCHEMA_VERSION,
    config_hash,
    load_results,
    render_markdown,
    run_key,
    save_results,
)

__all__ = ["CompareConfig", "CompareSummary", "RunSpec", "plan_runs", "resolve_task", "run_comparison",
           "default_output_dir"]

Logger = Callable[[str], None] | None


@dataclass
class CompareConfig:
    """Everything ``hf-camhd compare`` takes (``None`` = the task preset's value).

    Attributes:
        task: a preset of :mod:`hf_camhd.experiments.presets` (default ``mlp-digits``).
        model, dataset: override the preset's model (``mlp``, ``lenet5``, ``resnet18``, ``resnet34``) / dataset.
        optimizers: comparison arms (:mod:`hf_camhd.experiments.arms`); default: the preset's list.
        seeds, first_seed: run seeds ``first_seed … first_seed + seeds − 1``.
        epochs, batch_size: override the preset (``batch_size`` is the global batch, split across processes).
        levels, gamma: the CAM-HD tree / initial γ of the default-tree CAM-HD arms (``levels`` order).
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda``; under ``accelerate launch`` its config decides.
        mixed_precision: ``no``, ``fp16``, ``bf16`` or ``None`` (accelerate's config / environment).
        sweep_gamma: run the Figure 1 sweep instead: a 2-level CAM-HD arm with fixed γ (δ = 0) at
            γ_global ∈ ``sweep_values``.
        sweep_hypergrad_lr: run the β-sensitivity study instead: for every base of ``sweep_bases`` (default
            ``adam, sgdn``), the base optimizer without adaptation (the reference) and its CAM-HD arm on every
            rule of ``sweep_rules`` (default ``additive, normalized``; the task's tree, ``--levels`` /
            ``--gamma`` replace it) at every β of the rule's grid
            (:data:`~hf_camhd.experiments.presets.SWEEP_HYPERGRAD_LRS`, or ``sweep_betas`` for every rule).
        max_train_samples, max_test_samples: keep a fixed random subset (seed 0, same for every run).
        log_every: record γ and mean α per level every this many optimizer steps (and at the start / end).
        threads: torch intra-op threads on CPU (default 1: these small models train fastest on one
            thread, and several threads on a busy machine can be 100x slower); ignored on GPU.
        resume: reuse finished runs found in ``output_dir/results.json`` and continue an unfinished one from
            its last checkpoint (``output_dir/checkpoints/<run>.pt``, written after every epoch).
        keep_checkpoints: keep each run's last checkpoint (its final model, optimizer and generator
            states) instead of deleting it when the run finishes.
        progress, plots: show tqdm bars; write the PNG plots.
        command: the command line, recorded in results.json / results.md.
        push_to_hub, hub_model_id, hub_optimizer, hub_private, hub_token: publish the best seed of
            ``hub_optimizer`` (default: the first CAM-HD arm) as ``output_dir/hub`` and upload it to
            ``hub_model_id`` (:mod:`hf_camhd.experiments.publish`).
    """

    task: str = DEFAULT_TASK
    model: str | None = None
    dataset: str | None = None
    optimizers: Sequence[str] | None = None
    seeds: int = 3
    first_seed: int = 0
    epochs: int | None = None
    batch_size: int | None = None
    eval_batch_size: int = 1000
    levels: Sequence[str] | None = None
    gamma: Sequence[float] | None = None
    device: str = "auto"
    mixed_precision: str | None = None
    output_dir: str | None = None
    data_dir: str | None = None
    sweep_gamma: bool = False
    sweep_values: Sequence[float] = SWEEP_GAMMAS
    sweep_hypergrad_lr: bool = False
    sweep_bases: Sequence[str] | None = None
    sweep_rules: Sequence[str] | None = None
    sweep_betas: Sequence[float] | None = None
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    log_every: int = 50
    threads: int | None = None
    resume: bool = True
    keep_checkpoints: bool = False
    progress: bool = True
    plots: bool = True
    command: str | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_optimizer: str | None = None
    hub_private: bool = False
    hub_token: str | None = None

    def __post_init__(self) -> None:
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("Invalid hub_model_id: --push-to-hub needs --hub-model-id user/name")
        if self.sweep_gamma and self.sweep_hypergrad_lr:
            raise ValueError("Invalid sweep: --sweep-gamma and --sweep-hypergrad-lr are two studies; run them one at a "
                             "time (each writes its own output folder)")
        if self.push_to_hub and (self.sweep_gamma or self.sweep_hypergrad_lr):
            flag = "--sweep-gamma" if self.sweep_gamma else "--sweep-hypergrad-lr"
            raise ValueError(f"Invalid push_to_hub: publish from a comparison, not from a {flag} run")
        self._check_hypergrad_sweep()
        if self.push_to_hub:
            from ..hub import check_repo_id

            check_repo_id(self.hub_model_id, flag="--hub-model-id")
        if isinstance(self.first_seed, bool) or not isinstance(self.first_seed, int) or self.first_seed < 0:
            raise ValueError(f"Invalid first_seed: must be an integer >= 0 (seeds are first_seed ... "
                             f"first_seed + seeds - 1), got {self.first_seed!r}")
        for name in ("seeds", "epochs", "batch_size", "eval_batch_size", "max_train_samples", "max_test_samples",
                     "log_every", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Invalid {name}: must be a positive integer, got {value!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"Invalid device: {self.device!r}; expected auto, cpu or cuda")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"Invalid mixed_precision: {self.mixed_precision!r}; expected no, fp16 or bf16")
        for g in self.sweep_values:
            if not 0.0 <= float(g) <= 1.0:
                raise ValueError(f"Invalid sweep value: {g}; γ_global must lie in [0, 1]")

    def _check_hypergrad_sweep(self) -> None:
        given = [flag for flag, value in (("--bases", self.sweep_bases), ("--rules", self.sweep_rules),
                                          ("--betas", self.sweep_betas)) if value is not None]
        if given and not self.sweep_hypergrad_lr:
            raise ValueError(f"Invalid {given[0]}: it sets the β sweep; add --sweep-hypergrad-lr (or drop {given[0]})")
        if not self.sweep_hypergrad_lr:
            return
        if self.optimizers:
            raise ValueError("Invalid --optimizers for --sweep-hypergrad-lr: the sweep picks its arms from --bases "
                             f"({', '.join(CAMHD_BASES)}) and --rules (additive, normalized); drop --optimizers")
        for base in self.sweep_bases or ():
            if str(base).strip().lower() not in CAMHD_BASES:
                raise ValueError(f"Invalid --bases value: {base!r}; expected some of {', '.join(CAMHD_BASES)} "
                                 "(comma-separated)")
        for rule in self.sweep_rules or ():
            if str(rule).strip().lower() not in ("additive", "normalized"):
                raise ValueError(f"Invalid --rules value: {rule!r}; expected additive, normalized or both "
                                 "(comma-separated)")
        for beta in self.sweep_betas or ():
            if not (math.isfinite(float(beta)) and float(beta) > 0):
                raise ValueError(f"Invalid --betas value: {beta!r}; every β must be a finite number > 0 (the base "
                                 "optimizer, β = 0, is the sweep's reference line already)")
        rules = {str(r).strip().lower() for r in (self.sweep_rules or ("additive", "normalized"))}
        too_big = [float(b) for b in self.sweep_betas or () if float(b) >= NORMALIZED_HYPERGRAD_LR_BOUND]
        if "normalized" in rules and too_big:
            raise ValueError(f"Invalid --betas value: {too_big[0]!r} for the normalized rule, whose β is the fraction a "
                             "rate may move per step and must be < 1 (at 1 a step can set a rate to 0, for good); give "
                             "values below 1, or sweep β >= 1 with --rules additive only")


@dataclass(frozen=True)
class RunSpec:
    """One planned run."""

    arm: Arm
    seed: int
    hyperparameters: dict
    gamma_global: float | None = None
    hypergrad_lr: float | None = None  # the swept β (--sweep-hypergrad-lr); None elsewhere

    @property
    def key(self) -> str:
        return run_key(self.arm.name, self.seed, self.gamma_global, self.hypergrad_lr)

    @property
    def series(self) -> str:
        if self.hypergrad_lr is not None:
            return f"{self.arm.name}|hypergrad_lr={self.hypergrad_lr:g}"
        return self.arm.name if self.gamma_global is None else f"{self.arm.name}|gamma_global={self.gamma_global:g}"

    @property
    def display_name(self) -> str:
        if self.hypergrad_lr is not None:
            return f"{self.arm.display_name}, β = {self.hypergrad_lr:g}"
        if self.gamma_global is None:
            return self.arm.display_name
        return f"γ_global = {self.gamma_global:.1f}"


@dataclass
class CompareSummary:
    """What :func:`run_comparison` did: the results dict, where it wrote, which runs ran / were reused."""

    results: dict
    output_dir: Path
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    markdown: str = ""
    hub: dict | None = None


# ------------------------------------------------------------------------------------------------ planning
def resolve_task(cfg: CompareConfig) -> TaskPreset:
    """The task preset with the config's overrides (model, dataset, epochs, batch size)."""
    preset = get_task(cfg.task)
    changes: dict[str, Any] = {"dataset": cfg.dataset, "epochs": cfg.epochs, "batch_size": cfg.batch_size}
    if cfg.model is not None:
        model = cfg.model.strip().lower().replace("-", "")
        if model != preset.model:
            changes.update(model=model, model_kwargs={})  # the preset's model_kwargs belong to its own model
    if cfg.dataset is not None:
        changes["dataset"] = dataset_info(cfg.dataset).name
    return preset.with_overrides(**changes)


def plan_runs(cfg: CompareConfig, preset: TaskPreset) -> list[RunSpec]:
    """The runs of the comparison, in order: arm-major (all seeds of one arm, then the next)."""
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    if cfg.sweep_gamma:
        names = list(cfg.optimizers) if cfg.optimizers else ["adam-camhd-2level"]
        arms = [resolve_arm(n) for n in names]
        if len(arms) != 1 or arms[0].kind != "camhd":
            raise ValueError("Invalid --optimizers for --sweep-gamma: give one CAM-HD arm (default adam-camhd-2level)")
        arm = arms[0]
        tree_arm = replace(arm, tree="default") if cfg.levels is not None else arm  # --levels sets the swept tree
        runs = []
        for g in cfg.sweep_values:
            g = round(float(g), 6)
            kw = arm_hyperparameters(tree_arm, preset, levels=cfg.levels, gamma=(g, 1.0 - g), gamma_lr=0.0)
            if len(kw["levels"]) != 2:
                raise ValueError(f"Invalid --levels for --sweep-gamma: the sweep needs a two-level tree, got "
                                 f"{', '.join(kw['levels'])}")
            runs += [RunSpec(arm, s, kw, g) for s in seeds]
        return runs
    if cfg.sweep_hypergrad_lr:
        return _plan_hypergrad_sweep(cfg, preset, seeds)
    names = list(cfg.optimizers) if cfg.optimizers else list(preset.optimizers)
    arms = [resolve_arm(n) for n in names]
    seen = set()
    runs = []
    for arm in arms:
        if arm.name in seen:
            continue
        seen.add(arm.name)
        kw = arm_hyperparameters(arm, preset, levels=cfg.levels, gamma=cfg.gamma)
        runs += [RunSpec(arm, s, kw) for s in seeds]
    return runs


def _plan_hypergrad_sweep(cfg: CompareConfig, preset: TaskPreset, seeds: range) -> list[RunSpec]:
    """The β study: per base, its plain optimizer (the reference), then its CAM-HD arm per rule × β × seed."""
    bases = list(dict.fromkeys(str(b).strip().lower() for b in (cfg.sweep_bases or ("adam", "sgdn"))))
    rules = list(dict.fromkeys(str(r).strip().lower() for r in (cfg.sweep_rules or ("additive", "normalized"))))
    runs = []
    for base in bases:
        reference = resolve_arm(base)
        runs += [RunSpec(reference, s, arm_hyperparameters(reference, preset)) for s in seeds]
        for rule in rules:
            arm = resolve_arm(f"{base}-camhd" + ("-normalized" if rule == "normalized" else ""))
            kw = arm_hyperparameters(arm, preset, levels=cfg.levels, gamma=cfg.gamma)
            for beta in dict.fromkeys(float(b) for b in (cfg.sweep_betas or sweep_hypergrad_lrs(rule, arm.family))):
                runs += [RunSpec(arm, s, {**kw, "hypergrad_lr": beta}, hypergrad_lr=beta) for s in seeds]
    return runs


def run_kind(cfg: CompareConfig) -> str:
    """``results.json``'s ``kind``: ``compare``, ``sweep-gamma`` or ``sweep-hypergrad-lr``."""
    return "sweep-gamma" if cfg.sweep_gamma else "sweep-hypergrad-lr" if cfg.sweep_hypergrad_lr else "compare"


def default_output_dir(cfg: CompareConfig) -> Path:
    """``outputs/compare-<task>`` (``outputs/sweep-gamma-<task>``, ``outputs/sweep-hypergrad-lr-<task>`` for the
    sweeps), with ``-<model>`` / ``-<dataset>`` when overridden."""
    name = get_task(cfg.task).name
    if cfg.model:
        name += f"-{cfg.model}"
    if cfg.dataset:
        name += f"-{dataset_info(cfg.dataset).name}"
    kind = run_kind(cfg)
    return Path("outputs") / (("compare" if kind == "compare" else kind) + "-" + name)


def _run_hash(spec: RunSpec, preset: TaskPreset, cfg: CompareConfig, data_meta: dict,
              settings: dict | None = None) -> str:
    """Hash of everything that decides a run's numbers (not the output folder, device or logging).

    ``settings``: the CAM-HD settings the optimizer resolved (:func:`_camhd_settings`); hashed for the arms
    that take the optimizer's defaults (normalized rule, Schedule-Free CAM-HD), so that a run made under other
    defaults is not reused on resume."""
    task = preset.to_dict()
    for k in ("description", "optimizers", "name"):
        task.pop(k, None)
    fields = {
        "task": task, "arm": spec.arm.name, "seed": spec.seed, "hyperparameters": spec.hyperparameters,
        "gamma_global": spec.gamma_global, "schedule": uses_schedule(spec.arm, preset),
        "max_train_samples": cfg.max_train_samples, "max_test_samples": cfg.max_test_samples,
        "train_size": data_meta["train_size"], "test_size": data_meta["test_size"],
        "mixed_precision": cfg.mixed_precision or "no",
    }
    if settings is not None and spec.arm.rule in ("normalized", "default"):
        fields["optimizer_settings"] = settings
    return config_hash(fields)


# ------------------------------------------------------------------------------------------------ data
def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= y.shape[0]:
        return x, y
    # note: a fixed (seed 0) random subset, the same for every run and arm, sorted to keep the file order
    idx = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(0))[:n].sort().values
    return x[idx], y[idx]


def load_data(preset: TaskPreset, cfg: CompareConfig):
    """``(X_train, y_train, X_test, y_test, info, meta)`` as tensors; raises DatasetUnavailableError."""
    info = dataset_info(preset.dataset)
    ds = load_image_dataset(info.name, data_dir=cfg.data_dir)
    x, y = _subset(*as_tensors(ds["train"]), cfg.max_train_samples)
    xt, yt = _subset(*as_tensors(ds["test"]), cfg.max_test_samples)
    meta = {"dataset": info.name, "train_size": int(y.shape[0]), "test_size": int(yt.shape[0]),
            "full_train_size": int(ds["train"].num_rows), "full_test_size": int(ds["test"].num_rows),
            "source": cfg.data_dir or ("scikit-learn" if info.name == "digits" else
                                       str(info.system_dir) if info.system_dir and info.system_dir.is_dir()
                                       else f"hub:{info.hub_id}")}
    return x, y, xt, yt, info, meta


# ------------------------------------------------------------------------------------------------ accelerate
def _make_accelerator(cfg: CompareConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("Invalid device: 'cuda' requested but torch.cuda.is_available() is False; use --device cpu "
                         "(or auto)")
    # note: split_batches: --batch-size is the GLOBAL batch (Table 1's), divided over the processes
    return Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision,
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def _git_commit() -> str | None:
    """``<commit>`` (``+dirty`` when the package's tracked files have changes) of a source checkout, else None."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "hf_camhd"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _environment(accelerator, cfg: CompareConfig) -> dict:
    import accelerate

    from .. import __version__

    return {"hf_camhd": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "device": str(accelerator.device), "num_processes": accelerator.num_processes,
            "mixed_precision": str(accelerator.mixed_precision), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "git_commit": _git_commit(),
            "gpu": torch.cuda.get_device_name(0) if accelerator.device.type == "cuda" else None}


# ------------------------------------------------------------------------------------------------ one run
def _camhd_settings(opt) -> dict | None:
    """A CAM-HD optimizer's resolved hyper-gradient settings (β, δ, ρ, r, rule, bounds, …) as plain data;
    None for other optimizers."""
    import dataclasses

    config = getattr(opt, "config", None)
    if config is None or not dataclasses.is_dataclass(config):
        return None
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def _adapted_lr(opt) -> float | None:
    """The step size a learning-rate-free optimizer has chosen: Prodigy / D-Adapt Adam d·lr, DoG / LDoG the mean
    η over the tensors; None for the others (their users' top complaint: "the lr stays 1.0" in the logs)."""
    group = opt.param_groups[0]
    if "d" in group and "lr" in group:
        return float(group["d"]) * float(group["lr"])
    etas = group.get("eta")
    if isinstance(etas, (list, tuple)) and etas:
        return float(sum(float(e) for e in etas) / len(etas))
    return None


def _switches_mode(opt) -> bool:
    """True for optimizers that keep the point to evaluate apart from the point they train at (Schedule-Free,
    CAM-HD over Schedule-Free): they must be told ``train()`` / ``eval()``."""
    return callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))


def _train_mode(opt) -> None:
    """``opt.train()`` before training (Schedule-Free: parameters ← y, the point it trains at)."""
    opt.train()


def _eval_mode(opt) -> None:
    """``opt.eval()`` before every evaluation and checkpoint (Schedule-Free: parameters ← x, the average)."""
    opt.eval()


def _has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def _refresh_batch_norm(model: torch.nn.Module, loader, max_batches: int = 50) -> None:
    """Batch-norm statistics at the evaluated point x (Schedule-Free's README: after ``optimizer.eval()``, run up
    to 50 training batches through the model in train mode). ``loader``: the training set in file order without
    augmentation, so no generator of the run is touched."""
    import itertools

    model.train()
    for batch in itertools.islice(loader, max_batches):
        model(batch["pixel_values"])
    model.eval()


def _hyper_entry(opt, step: int, steps_per_epoch: int) -> dict:
    stats = opt.lr_stats()
    return {"step": step, "epoch": step / max(1, steps_per_epoch),
            "gamma": {lv: float(stats[f"camhd/gamma_{lv}"]) for lv in opt.levels},
            "alpha_mean": {lv: float(stats[f"camhd/alpha_{lv}_mean"]) for lv in opt.levels},
            "effective_lr_mean": float(stats["camhd/effective_lr_mean"])}


CHECKPOINTS = "checkpoints"
_CHECKPOINT_FORMAT = 1
_AVERAGER_GAMMA = 8.0  # dog.PolynomialDecayAverager's default γ, which its README says works out of the box


def checkpoint_path(out_dir: Path, key: str) -> Path:
    """Where run ``key``'s state is kept between epochs: ``OUTPUT_DIR/checkpoints/<key>.pt`` (``|`` → ``__``)."""
    return Path(out_dir) / CHECKPOINTS / (key.replace("|", "__") + ".pt")


def _save_run_checkpoint(path: Path, accelerator, *, key: str, config_hash_: str, epoch: int, step: int, model,
                         optimizer, scheduler, generators: dict, record: dict, elapsed: float, averager=None) -> None:
    """Write the run's state after ``epoch`` atomically (main process; every process takes part in the gather)."""
    from accelerate.utils import gather_object

    # note: each process augments its own share of a batch, so every process's augmentation generator is kept
    transform = gather_object([generators["transform"].get_state()])
    if not accelerator.is_main_process:
        return
    state = {"format": _CHECKPOINT_FORMAT, "key": key, "config_hash": config_hash_, "epoch": epoch, "step": step,
             "model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "shuffle_generator": generators["shuffle"].get_state(), "transform_generators": transform,
             "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if accelerator.device.type == "cuda" else None,
             "record": {"epochs": record["epochs"], "hyper_log": record["hyper_log"]}, "elapsed_s": elapsed,
             "averager": averager.state_dict() if averager is not None else None}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_run_checkpoint(path: Path, key: str, config_hash_: str, num_processes: int) -> dict | None:
    """The saved state of run ``key``, or ``None`` when there is none or it belongs to another configuration.

    A truncated or corrupted file raises :class:`~hf_camhd.files.CorruptFileError` naming it."""
    if not path.is_file():
        return None
    fix = "Delete it (the run then restarts from its first epoch), or pass --no-resume to rerun every run."
    check_file(path, fix=fix, what=f"Checkpoint of run {key}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types; one message for all
        raise CorruptFileError(f"Checkpoint file {str(path)!r} of run {key} cannot be loaded ({type(err).__name__}: "
                               f"{err}). {fix}") from None
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT or state.get("key") != key:
        raise CorruptFileError(f"Checkpoint file {str(path)!r} is not a checkpoint of run {key} written by this "
                               f"version of hf-camhd compare. {fix}")
    if state["config_hash"] != config_hash_:
        return None
    if len(state["transform_generators"]) != num_processes:
        raise ValueError(f"Invalid number of processes: checkpoint {str(path)!r} of run {key} was written by "
                         f"{len(state['transform_generators'])} process(es), this comparison runs {num_processes}; "
                         "resume with the same number of processes, or pass --no-resume")
    return state


def _train_run(spec: RunSpec, preset: TaskPreset, cfg: CompareConfig, data, accelerator, record: dict,
               on_epoch: Callable[[], None], checkpoint: Path | None = None, log: Logger = None):
    """Train and evaluate one run, filling ``record`` (and calling ``on_epoch`` after every epoch).

    With ``checkpoint``, the run's state is saved there after every epoch but the last (and after the last
    with ``cfg.keep_checkpoints``), and a saved state of the same configuration is resumed from.

    Returns the trained model (unwrapped) and its optimizer."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    x, y, xt, yt, info, _ = data
    accuracy = load_metric("accuracy")  # the evaluate module shipped in hf_camhd.metrics
    set_seed(spec.seed)  # note: python, numpy and torch RNGs: the model's init depends on the seed only
    model = build_model(preset.model, info, preset.model_kwargs, cifar_stem=preset.resnet_cifar_stem)
    # note: move the model before building the optimizer, so CAM-HD's model-wide state (γ, coarse α) is
    # created on the training device rather than moved there afterwards
    model = model.to(accelerator.device)
    optimizer = build_optimizer(spec.arm, model, spec.hyperparameters,
                                total_steps=_total_steps(preset, int(y.shape[0])))
    transform_gen = torch.Generator().manual_seed(10_000 + spec.seed)
    shuffle_gen = torch.Generator().manual_seed(spec.seed)
    train_ds = TensorImageDataset(x, y, transform=train_transform(info.name, generator=transform_gen))
    train_loader = DataLoader(train_ds, batch_size=preset.batch_size, shuffle=True, generator=shuffle_gen)
    test_loader = DataLoader(TensorImageDataset(xt, yt), batch_size=cfg.eval_batch_size, shuffle=False)
    switches = _switches_mode(optimizer)
    bn_loader = None
    if switches and _has_batch_norm(model):
        bn_loader = accelerator.prepare(DataLoader(TensorImageDataset(x, y), batch_size=preset.batch_size,
                                                   shuffle=False))
    scheduler = None
    if uses_schedule(spec.arm, preset):
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(preset.sgd_milestones),
                                                         gamma=preset.sgd_lr_factor)
    model, opt, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    inner = opt.optimizer if hasattr(opt, "optimizer") else opt
    with_loss = requires_loss(inner)
    logs_hyper = hasattr(inner, "lr_stats")
    steps_per_epoch = len(train_loader)
    averager = None
    if spec.arm.averaging == "polynomial-decay":
        from dog import PolynomialDecayAverager

        # note: DoG's README: DoG / LDoG must be combined with iterate averaging; every evaluation (and the
        # reported numbers) use the averaged weights
        averager = PolynomialDecayAverager(accelerator.unwrap_model(model), gamma=_AVERAGER_GAMMA)
    record.update(optimizer={"name": spec.arm.optimizer, "class": type(inner).__name__, "kind": spec.arm.kind,
                             "hyperparameters": spec.hyperparameters, "settings": _camhd_settings(inner),
                             "train_eval_switch": switches,
                             "averaging": ({"type": "PolynomialDecayAverager", "gamma": _AVERAGER_GAMMA,
                                            "evaluated": "averaged model"} if averager is not None else None),
                             "lr_schedule": ({"type": "MultiStepLR", "milestones": list(preset.sgd_milestones),
                                              "gamma": preset.sgd_lr_factor} if scheduler else None)},
                  num_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  steps_per_epoch=steps_per_epoch, epochs=[], hyper_log=[])
    if logs_hyper:
        record["hyper_log"].append(_hyper_entry(inner, 0, steps_per_epoch))

    first_epoch, step, elapsed = 1, 0, 0.0
    saved = (_load_run_checkpoint(checkpoint, spec.key, record["config_hash"], accelerator.num_processes)
             if checkpoint is not None and cfg.resume else None)
    if saved is not None:
        # note: everything the next epoch reads — weights, optimizer and scheduler state, the shuffle and
        # augmentation generators, the global RNG — so the rest of the run is the uninterrupted one's
        accelerator.unwrap_model(model).load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        shuffle_gen.set_state(saved["shuffle_generator"])
        transform_gen.set_state(saved["transform_generators"][accelerator.process_index])
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] is not None and accelerator.device.type == "cuda":
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        if averager is not None:
            averager.load_state_dict(saved["averager"])
        record.update(saved["record"])
        first_epoch, step, elapsed = saved["epoch"] + 1, saved["step"], saved["elapsed_s"]
        _say(log, f"{spec.key}: continuing after epoch {saved['epoch']} from {checkpoint}")

    bar = tqdm(total=preset.epochs * steps_per_epoch, initial=step, desc=f"{spec.display_name} seed {spec.seed}",
               disable=not (cfg.progress and accelerator.is_main_process), leave=False, dynamic_ncols=True,
               file=sys.stderr)
    start = time.perf_counter() - elapsed
    for epoch in range(first_epoch, preset.epochs + 1):
        model.train()
        if switches:  # note: also after every evaluation / checkpoint, which leave the optimizer in eval mode
            _train_mode(inner)
        loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        for batch in train_loader:
            logits = logits_of(model(batch["pixel_values"]))
            loss = F.cross_entropy(logits.float(), batch["labels"])
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if with_loss:
                # note: L4 needs the loss; in data parallel every process must see the same (mean) loss
                step_loss = accelerator.reduce(loss.detach(), "mean") if accelerator.num_processes > 1 else loss.detach()
                opt.step(lambda: step_loss)
            else:
                opt.step()
            if averager is not None:
                averager.step()
            step += 1
            n = batch["labels"].shape[0]
            loss_sum += loss.detach().double() * n
            count += n
            if logs_hyper and step % cfg.log_every == 0:
                record["hyper_log"].append(_hyper_entry(inner, step, steps_per_epoch))
            bar.update(1)
            if step % 20 == 0 and bar.disable is False:
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.4f}")
        if scheduler is not None:
            scheduler.step()
        loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
        train_loss = float(loss_sum / count)
        if switches:  # note: Schedule-Free's README: eval() before every evaluation and every checkpoint
            _eval_mode(inner)
            if bn_loader is not None:
                _refresh_batch_norm(model, bn_loader)
        if averager is not None:
            with accelerator.autocast():
                test_loss, test_metrics = _evaluate(averager.averaged_model, test_loader, accelerator, accuracy)
        else:
            test_loss, test_metrics = _evaluate(model, test_loader, accelerator, accuracy)
        group = inner.param_groups[0]
        entry = {"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                 "test_accuracy": 100.0 * test_metrics["accuracy"], "test_metrics": test_metrics,
                 "lr_factor": group["lr"] / group.get("initial_lr", group["lr"]) if group.get("lr") else None,
                 "wall_time_s": time.perf_counter() - start}
        adapted = _adapted_lr(inner)
        if adapted is not None:
            entry["adapted_lr"] = adapted
        record["epochs"].append(entry)
        if checkpoint is not None and (epoch < preset.epochs or cfg.keep_checkpoints):
            _save_run_checkpoint(checkpoint, accelerator, key=spec.key, config_hash_=record["config_hash"], epoch=epoch,
                                 step=step, model=model, optimizer=opt, scheduler=scheduler,
                                 generators={"shuffle": shuffle_gen, "transform": transform_gen}, record=record,
                                 elapsed=time.perf_counter() - start, averager=averager)
        on_epoch()
    bar.close()
    if logs_hyper and (not record["hyper_log"] or record["hyper_log"][-1]["step"] != step):
        record["hyper_log"].append(_hyper_entry(inner, step, steps_per_epoch))
    last = record["epochs"][-1]
    record["final"] = {"test_accuracy": last["test_accuracy"], "test_metrics": last["test_metrics"],
                       "test_loss": last["test_loss"], "train_loss": last["train_loss"],
                       "gamma": record["hyper_log"][-1]["gamma"] if logs_hyper else None,
                       "alpha_mean": record["hyper_log"][-1]["alpha_mean"] if logs_hyper else None}
    # note: a NaN / inf loss anywhere (train or test) marks the run; its numbers are still reported
    record["diverged"] = not all(_finite(e["train_loss"]) and _finite(e["test_loss"]) for e in record["epochs"])
    record["wall_time_s"] = time.perf_counter() - start
    # the model the reported numbers are of: DoG's averaged weights; Schedule-Free's x (left in eval mode)
    trained = averager.averaged_model if averager is not None else accelerator.unwrap_model(model)
    accelerator.free_memory()
    return trained, inner


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _total_steps(preset: TaskPreset, train_size: int) -> int:
    """The run's optimizer steps: batches per epoch (the last one partial) × epochs."""
    return math.ceil(train_size / preset.batch_size) * preset.epochs


@torch.no_grad()
def _evaluate(model, loader, accelerator, metric) -> tuple[float, dict[str, float]]:
    """``(mean cross entropy, metric results)`` over the whole test split (gathered over processes); ``metric``
    is an ``evaluate`` module (``{"accuracy": fraction}`` for :mod:`hf_camhd.metrics`' accuracy)."""
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    count = 0
    for batch in loader:
        logits = logits_of(model(batch["pixel_values"])).float()
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        metric.add_batch(predictions=logits.argmax(-1).cpu().numpy(), references=labels.cpu().numpy())
        count += labels.shape[0]
    return float(loss_sum) / count, metric.compute()


def _check_arms(plan: Sequence[RunSpec], preset: TaskPreset, info, mixed_precision: str,
                total_steps: int) -> dict[str, dict | None]:
    """Build every distinct optimizer once on a throw-away model, so a bad tree / γ fails before training.

    Returns the CAM-HD settings each run's optimizer resolves (:func:`_camhd_settings`), by run key."""
    if mixed_precision == "fp16":
        needs_loss = sorted({s.arm.name for s in plan if s.arm.name == "adam-l4"})
        if needs_loss:
            raise ValueError(f"Invalid optimizers for fp16: {needs_loss[0]} steps with a loss closure, which torch's "
                             "GradScaler does not support; use --mixed-precision bf16 or no")
    model = None
    built: dict[tuple, dict | None] = {}
    settings = {}
    for spec in plan:
        key = (spec.arm.name, config_hash(spec.hyperparameters))
        if key not in built:
            if model is None:
                with torch.random.fork_rng(devices=[]):
                    model = build_model(preset.model, info, preset.model_kwargs, cifar_stem=preset.resnet_cifar_stem)
            built[key] = _camhd_settings(build_optimizer(spec.arm, model, spec.hyperparameters,
                                                         total_steps=total_steps))
        settings[spec.key] = built[key]
    return settings


# ------------------------------------------------------------------------------------------------ comparison
def _say(log: Logger, msg: str) -> None:
    if log is not None:
        log(msg)


def check_output_dir(out_dir: Path) -> Path:
    """``out_dir`` if it is, or can become, a writable folder; else ValueError naming it and the fix."""
    fix = "pass --output-dir a folder path (it is created if missing)"
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is a file" if parent == out_dir else f"is inside {str(parent)!r}, which is a file"
                raise ValueError(f"Invalid output_dir {str(out_dir)!r}: it {what}; {fix}")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"Invalid output_dir {str(out_dir)!r}: {str(parent)!r} is not writable; {fix}")
            break
    return out_dir


def _require_packages(plan: Sequence[RunSpec]) -> dict[str, str]:
    """Import the optional package of every arm that needs one (ImportError naming the ``experiments`` extra when
    one is missing); returns ``{distribution: version}`` of those packages, for the results' provenance."""
    from importlib import metadata

    versions = {}
    for arm in dict.fromkeys(s.arm for s in plan if s.arm.package):
        require(f"the {arm.name} arm of hf-camhd compare", arm.package, extra="experiments")
        for dist in metadata.packages_distributions().get(arm.package, [arm.package]):
            try:
                versions[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                versions[dist] = None
    return versions


def run_comparison(cfg: CompareConfig, *, log: Logger = print) -> CompareSummary:
    """Run (or resume) the comparison ``cfg`` and write results.json, results.md and the plots.

    Raises :class:`hf_camhd.data.DatasetUnavailableError` when the dataset is missing and ValueError on
    a bad configuration (both before any training).
    """
    preset = resolve_task(cfg)
    plan = plan_runs(cfg, preset)  # validates arm names and trees before loading data
    packages = _require_packages(plan)  # a missing optional package: one error naming the extra, before any work
    out_dir = check_output_dir(Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg))
    accelerator = _make_accelerator(cfg)
    if accelerator.device.type == "cpu":
        # note: one intra-op thread by default: on a shared 2-core machine torch's default (all cores)
        # spin-waits, measured 100 MLP steps in 41 s vs 0.27 s with one thread
        torch.set_num_threads(cfg.threads or 1)
    data = load_data(preset, cfg)
    data_meta = data[-1]
    main = accelerator.is_main_process
    log = log if main else None

    settings = _check_arms(plan, preset, data[4], str(accelerator.mixed_precision),
                           _total_steps(preset, data_meta["train_size"]))
    hashes = {spec.key: _run_hash(spec, preset, cfg, data_meta, settings[spec.key]) for spec in plan}
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "command"}
    config.update(task=preset.name, optimizers=list(dict.fromkeys(s.arm.name for s in plan)),
                  series=list(dict.fromkeys(s.series for s in plan)), epochs=preset.epochs,
                  batch_size=preset.batch_size, model=preset.model, dataset=preset.dataset,
                  output_dir=str(out_dir))
    results = {"schema_version": SCHEMA_VERSION, "kind": run_kind(cfg),
               "command": cfg.command, "config": config, "task": preset.to_dict(), "data": data_meta,
               "environment": {**_environment(accelerator, cfg), "optimizer_packages": packages}, "runs": [],
               "plots": {}}

    path = out_dir / "results.json"
    if main:
        # note: a kill during an atomic write leaves only a temporary file; the target holds its last version
        for folder in (out_dir, out_dir / CHECKPOINTS, out_dir / "hub_candidates"):
            recover_leftovers(folder, log=lambda line: _say(log, f"note: {line}"))
    previous = load_results(path) if cfg.resume else None
    hub_arm = None
    if cfg.push_to_hub:
        from .publish import default_hub_arm, has_candidate, save_candidate

        arms = list(dict.fromkeys(s.arm.name for s in plan))
        hub_arm = cfg.hub_optimizer or default_hub_arm(arms)
        if hub_arm not in arms:
            raise ValueError(f"Invalid hub_optimizer {hub_arm!r}: not among this comparison's optimizers {arms}")
        if preset.model.startswith("resnet") and preset.resnet_cifar_stem:
            raise ValueError("Invalid push_to_hub: the CIFAR-stem ResNet is not a stock timm architecture, so "
                             "timm.create_model could not load it; publish a LeNet-5 / MLP task, or train a timm "
                             "model with scripts/train_image_classifier.py --push_to_hub")
    reusable = {}
    if previous is not None:
        for r in previous.get("runs", []):
            if r.get("status") == "finished" and hashes.get(r.get("key")) == r.get("config_hash"):
                if hub_arm is not None and r.get("arm") == hub_arm and not has_candidate(out_dir, r["key"]):
                    continue  # its weights were not kept: train it again (deterministic) to publish it
                reusable[r["key"]] = r
    accelerator.wait_for_everyone()
    if main and path.exists() and (previous is None or len(reusable) != len(previous.get("runs", []))):
        atomic_write(out_dir / "results.previous.json", path.read_bytes())
        _say(log, f"note: {path} held runs of another configuration (or unfinished runs); kept a copy in "
                  f"results.previous.json")

    summary = CompareSummary(results=results, output_dir=out_dir)

    def write() -> None:
        if main:
            save_results(path, results)

    _say(log, f"hf-camhd compare: task {preset.name} ({preset.model} on {preset.dataset}, "
              f"{data_meta['train_size']} train / {data_meta['test_size']} test), {preset.epochs} epochs, batch "
              f"{preset.batch_size}, {len(plan)} runs -> {out_dir}")
    for i, spec in enumerate(plan, 1):
        ckpt = checkpoint_path(out_dir, spec.key)
        if spec.key in reusable:
            if main and not cfg.keep_checkpoints:
                ckpt.unlink(missing_ok=True)  # a kill between the run's last write and this deletion left it
            results["runs"].append(reusable[spec.key])
            summary.skipped.append(spec.key)
            _say(log, f"[{i}/{len(plan)}] {spec.key}: finished earlier, skipped")
            continue
        record = {"key": spec.key, "arm": spec.arm.name, "series": spec.series, "display_name": spec.display_name,
                  "seed": spec.seed, "gamma_global": spec.gamma_global, "hypergrad_lr": spec.hypergrad_lr,
                  "config_hash": hashes[spec.key],
                  "status": "running",
                  "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  # note: per-run provenance; the top-level "environment" is the latest invocation's
                  "environment": {k: results["environment"][k] for k in
                                  ("git_commit", "torch", "device", "num_processes", "mixed_precision")}}
        results["runs"].append(record)
        trained, trained_opt = _train_run(spec, preset, cfg, data, accelerator, record, write, ckpt, log)
        if hub_arm is not None and spec.arm.name == hub_arm and main:
            save_candidate(out_dir, spec.key, trained, trained_opt)
        record["status"] = "finished"
        record["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        summary.executed.append(spec.key)
        write()
        if main and not cfg.keep_checkpoints:
            ckpt.unlink(missing_ok=True)
        _say(log, f"[{i}/{len(plan)}] {spec.key}: test acc {record['final']['test_accuracy']:.2f}%, "
                  f"test loss {record['final']['test_loss']:.4f}, {record['wall_time_s']:.1f}s")

    if main:
        if cfg.plots:
            from .plots import write_plots

            results["plots"] = write_plots(results, out_dir)
        write()
        summary.markdown = render_markdown(results)
        atomic_write(out_dir / "results.md", summary.markdown + "\n")
        if hub_arm is not None:
            from .publish import publish_best

            fresh = build_model(preset.model, data[4], preset.model_kwargs, cifar_stem=preset.resnet_cifar_stem)
            summary.hub = publish_best(results, out_dir, hub_arm, fresh, data[4], repo_id=cfg.hub_model_id,
                                       private=cfg.hub_private, token=cfg.hub_token)
            _say(log, (f"published run {summary.hub['run']} to {cfg.hub_model_id}" if summary.hub["pushed"] else
                       summary.hub["error"]))
    accelerator.wait_for_everyone()
    return summary
