"""Comparison arms: the names ``--optimizers`` accepts, and how each becomes an optimizer under a task preset.

An *arm* is one optimizer configuration of a comparison. Its hyper-parameters come from the task
preset (:mod:`hf_camhd.experiments.presets`): the Adam family reads ``adam_lr`` / ``adam_hypergrad_lr``,
the SGD family ``sgd_lr`` / ``momentum`` / ``sgd_hypergrad_lr``; every CAM-HD arm also reads the tree,
γ, δ (``gamma_lr``) and r (``decay_rate``).

* ``adam``, ``adamw``, ``radam`` (Adam, AdamW, RAdam): torch.optim through ``hf_camhd.baselines``,
  lr = ``adam_lr`` (AdamW: decoupled decay ``adamw_weight_decay``).
* ``adabound`` (AdaBound): ``hf_camhd.baselines.AdaBound``, lr = ``adam_lr``, final_lr 0.1, gamma 1e-3.
* ``adam-l4`` (Adam-L4): ``hf_camhd.baselines.L4``, α = 0.15, stepped with a closure returning the loss.
* ``sgd``, ``sgdn`` (SGD, SGDN): torch.optim.SGD, lr = ``sgd_lr``, heavy-ball momentum 0.9 (sgdn: Nesterov).
* ``adam-hd``, ``adamw-hd``, ``sgd-hd``, ``sgdn-hd`` (Adam-HD, …): the global-only CAM-HD tree, i.e.
  Baydin et al.'s hyper-gradient descent, β = the family's hyper-gradient lr; the SGD ones use the
  preset's momentum (``sgdn-hd``: Nesterov), so each pairs with its baseline.
* ``adam-camhd`` (Adam-CAM-HD): CAMHDAdam on the preset's two-level tree (``--levels`` / ``--gamma``
  replace it).
* ``adam-camhd-2level`` (Adam-CAM-HD (2-level)): the preset's two-level tree — MLP: global + layer,
  γ = (0.5, 0.5); CNN: global + unit (the paper's filter level), γ = (0.8, 0.2).
* ``adam-camhd-3level`` (Adam-CAM-HD (3-level)): global + layer + parameter, γ = (0.4, 0.3, 0.3).
* ``adamw-camhd``, ``sgd-camhd``, ``sgdn-camhd``, each with an optional ``-2level`` / ``-3level``
  suffix: the same trees on CAMHDAdamW / CAMHDSGD (heavy-ball momentum; ``sgdn``: Nesterov).
* ``…-camhd-normalized`` (``adam-camhd-normalized``, ``sgdn-camhd-normalized``, ``adamw-camhd-normalized``,
  also with ``-2level`` / ``-3level`` before the suffix): the same trees and task settings (lr, momentum,
  weight decay, initial γ) on the scale-free ``hypergrad_rule="normalized"``. β, δ, ρ and r are NOT set
  here: the optimizer's defaults apply, so a change of defaults flows through (the runner records the
  values used). The paper's arms above keep ``hypergrad_rule="additive"`` with Table 1's β.
* ``sfadamw-camhd`` (SF-AdamW-CAM-HD, ``-2level`` / ``-3level`` too): CAMHDScheduleFreeAdamW on the preset's
  tree with Schedule-Free AdamW's settings (below) and the optimizer's defaults for everything CAM-HD.

The learning-rate-free optimizers users pick instead, each as its README recommends (the packages come
with the ``experiments`` extra):

* ``prodigy`` (Prodigy): lr 1.0 with the package's defaults (d₀ 1e-6); the Adam family's weight decay as an
  L2 term (``decouple=False``, as Adam); ``safeguard_warmup=True`` when the arm runs under a schedule.
* ``dadapt-adam`` (D-Adapt Adam): lr 1.0, the Adam family's weight decay (L2, its default).
  Prodigy and D-Adaptation follow the task's step schedule when it has one (D-Adaptation's README: "use
  the same learning rate scheduler you would normally use on the problem").
* ``schedulefree-adamw`` (Schedule-Free AdamW): lr 0.0025 (the package's default and its MNIST example's;
  the README: 1x–10x the scheduled AdamW rate), the task's AdamW (decoupled) weight decay, a linear warm-up over
  the first 5 % of the run's steps (the README recommends a warm-up without giving a length; 5 % is ours).
  No schedule: the runner calls ``optimizer.train()`` / ``optimizer.eval()`` around every evaluation.
* ``dog``, ``ldog`` (DoG, LDoG): lr 1.0, ``reps_rel`` 1e-6 (1e-4 for models with batch norm, as the README
  advises), the SGD family's weight decay, no schedule, and the polynomial-decay iterate averaging the README
  requires (``dog.PolynomialDecayAverager``, γ = 8): the reported numbers are the averaged model's.

``sgdm-camhd`` is accepted for ``sgd-camhd`` and ``l4`` for ``adam-l4``. The HD arms use no decay
(r = 0), as in Baydin et al.; the paper's CAM-HD arms use the preset's r. The SGD-family arms follow the
preset's step schedule (``sgd_milestones``); CAM-HD treats it as a multiplier on its learned rates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn
from torch.optim import Optimizer

from ..baselines import create_baseline
from ..optim import create_optimizer
from .presets import TaskPreset

__all__ = ["Arm", "BASELINE_ARMS", "LR_FREE_ARMS", "HD_ARMS", "CAMHD_BASES", "resolve_arm", "arm_names",
           "arm_hyperparameters", "build_optimizer", "uses_schedule", "SCHEDULE_FREE_LR", "SCHEDULE_FREE_WARMUP"]

BASELINE_ARMS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "sgdn": "SGDN", "radam": "RAdam",
                 "adabound": "AdaBound", "adam-l4": "Adam-L4"}
#: arm -> (display name, family, follows the task's step schedule, iterate averaging, import name of its package)
LR_FREE_ARMS = {
    "prodigy": ("Prodigy", "adam", True, None, "prodigyopt"),
    "schedulefree-adamw": ("Schedule-Free AdamW", "adam", False, None, "schedulefree"),
    "dadapt-adam": ("D-Adapt Adam", "adam", True, None, "dadaptation"),
    "dog": ("DoG (averaged)", "sgd", False, "polynomial-decay", "dog"),
    "ldog": ("LDoG (averaged)", "sgd", False, "polynomial-decay", "dog"),
}
HD_ARMS = {"adam-hd": "Adam-HD", "adamw-hd": "AdamW-HD", "sgd-hd": "SGD-HD", "sgdn-hd": "SGDN-HD"}
CAMHD_BASES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "sgdn": "SGDN"}
_ALIASES = {"l4": "adam-l4", "sgd-nesterov": "sgdn", "sgdm-camhd": "sgd-camhd", "sf-adamw": "schedulefree-adamw",
            "schedule-free-adamw": "schedulefree-adamw", "d-adapt-adam": "dadapt-adam"}
_CAMHD_RE = re.compile(r"^(adam|adamw|sgd|sgdn|sgdm|sfadamw)-camhd(?:-([23])-?level)?(-normalized)?$")

#: Schedule-Free AdamW's lr (the package's default, used by its MNIST example) and warm-up (a fraction of the
#: run's optimizer steps; the README recommends a warm-up but gives no length: 5 % is ours)
SCHEDULE_FREE_LR = 0.0025
SCHEDULE_FREE_WARMUP = 0.05


@dataclass(frozen=True)
class Arm:
    """One comparison arm.

    Attributes:
        name: canonical arm name (``adam-camhd-3level``).
        display_name: the name shown in tables and plots (``Adam-CAM-HD (3-level)``).
        family: ``adam`` (Adam-like base) or ``sgd`` (SGD-like base); selects the preset's lr / β.
        kind: ``baseline``, ``hd`` (global-only hyper-gradient tree) or ``camhd``.
        optimizer: the ``hf_camhd.baselines`` or ``hf_camhd.create_optimizer`` name it builds.
        tree: ``None`` (baselines), ``global`` (HD), ``default`` (CAM-HD, ``--levels`` may change it),
            ``2level`` or ``3level``.
        rule: the hyper-gradient rule of HD / CAM-HD arms: ``additive`` (the paper's, with Table 1's β),
            ``normalized``, or ``default`` (whatever the optimizer's default is: ``sfadamw-camhd``).
        schedule: whether the arm follows the task's step schedule when the task has one.
        averaging: ``polynomial-decay`` when the arm is evaluated on its averaged iterates (DoG), else None.
        package: import name of the optional package the arm needs (``None``: torch and hf_camhd only).
    """

    name: str
    display_name: str
    family: str
    kind: str
    optimizer: str
    tree: str | None = None
    rule: str | None = None
    schedule: bool = False
    averaging: str | None = None
    package: str | None = None


def arm_names() -> list[str]:
    """Every arm name (the CAM-HD ones with and without the -2level / -3level and -normalized suffixes)."""
    names = list(BASELINE_ARMS) + list(LR_FREE_ARMS) + list(HD_ARMS)
    for suffix in ("", "-normalized"):
        for base in CAMHD_BASES:
            names += [f"{base}-camhd{suffix}", f"{base}-camhd-2level{suffix}", f"{base}-camhd-3level{suffix}"]
    names += ["sfadamw-camhd", "sfadamw-camhd-2level", "sfadamw-camhd-3level"]
    return names


def resolve_arm(name: str) -> Arm:
    """The :class:`Arm` for ``name`` (case-insensitive, ``_`` accepted for ``-``); unknown names raise ValueError."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in BASELINE_ARMS:
        family = "sgd" if key.startswith("sgd") else "adam"
        return Arm(key, BASELINE_ARMS[key], family, "baseline", key, schedule=family == "sgd")
    if key in LR_FREE_ARMS:
        display, family, schedule, averaging, package = LR_FREE_ARMS[key]
        return Arm(key, display, family, "baseline", key, schedule=schedule, averaging=averaging, package=package)
    if key in HD_ARMS:
        family = "sgd" if key.startswith("sgd") else "adam"
        return Arm(key, HD_ARMS[key], family, "hd", key, "global", rule="additive", schedule=family == "sgd")
    m = _CAMHD_RE.match(key)
    if m:
        base = "sgd" if m.group(1) == "sgdm" else m.group(1)
        tree = "default" if m.group(2) is None else f"{m.group(2)}level"
        family = "sgd" if base.startswith("sgd") else "adam"
        if base == "sfadamw":  # note: the normalized rule is its default; -normalized names the same arm
            canonical = "sfadamw-camhd" + ("" if m.group(2) is None else f"-{m.group(2)}level")
            display = "SF-AdamW-CAM-HD" + ("" if m.group(2) is None else f" ({m.group(2)}-level)")
            return Arm(canonical, display, family, "camhd", "sfadamw-camhd", tree, rule="default")
        rule = "normalized" if m.group(3) else "additive"
        canonical = f"{base}-camhd" + ("" if m.group(2) is None else f"-{m.group(2)}level") + (m.group(3) or "")
        notes = ([] if m.group(2) is None else [f"{m.group(2)}-level"]) + (["normalized"] if m.group(3) else [])
        display = f"{CAMHD_BASES[base]}-CAM-HD" + (f" ({', '.join(notes)})" if notes else "")
        return Arm(canonical, display, family, "camhd", f"{base}-camhd", tree, rule=rule, schedule=family == "sgd")
    raise ValueError(f"Unknown optimizer {name!r} for --optimizers; expected one of {', '.join(arm_names())} "
                     "(see hf_camhd.experiments.arms)")


def arm_hyperparameters(arm: Arm, preset: TaskPreset, *, levels: Sequence[str] | None = None,
                        gamma: Sequence[float] | None = None, gamma_lr: float | None = None) -> dict[str, Any]:
    """The keyword arguments the arm's optimizer gets under ``preset`` (plain JSON-able data).

    ``levels`` / ``gamma`` replace the tree of the ``default``-tree CAM-HD arms (``--levels`` /
    ``--gamma``); ``gamma`` alone re-weights the preset tree of every CAM-HD arm whose level count it
    fits. ``gamma_lr`` overrides δ (the γ sweep fixes it to 0).
    """
    p = preset
    if arm.kind == "baseline":
        if arm.name == "adam-l4":
            return {}  # L4's recommended α = 0.15 (the registry default); L4 has no weight decay
        if arm.name in LR_FREE_ARMS:
            return _lr_free_hyperparameters(arm, p)
        if arm.family == "sgd":
            kw: dict[str, Any] = {"lr": p.sgd_lr, "momentum": p.momentum, "weight_decay": p.sgd_weight_decay}
            if arm.name == "sgdn":
                kw["nesterov"] = True
            return kw
        wd = p.adamw_weight_decay if arm.name == "adamw" else p.weight_decay
        return {"lr": p.adam_lr, "weight_decay": wd}

    if arm.optimizer == "sfadamw-camhd":
        kw = {"lr": SCHEDULE_FREE_LR, "weight_decay": p.adamw_weight_decay, "warmup_fraction": SCHEDULE_FREE_WARMUP}
    elif arm.family == "sgd":
        kw = {"lr": p.sgd_lr, "momentum": p.momentum, "weight_decay": p.sgd_weight_decay}
    else:
        kw = {"lr": p.adam_lr, "weight_decay": p.adamw_weight_decay if arm.optimizer.startswith("adamw")
              else p.weight_decay}
    if arm.rule == "additive":
        # note: the paper's arms run the paper's (additive) rule with Table 1's β
        kw.update(hypergrad_lr=p.sgd_hypergrad_lr if arm.family == "sgd" else p.adam_hypergrad_lr,
                  hypergrad_rule="additive")
    elif arm.rule == "normalized":
        kw["hypergrad_rule"] = "normalized"  # note: β, δ, ρ, r: the optimizer's defaults (not hard-coded here)
    if arm.kind == "hd":
        return kw  # global-only tree (fixed by the registry), no decay, as Baydin et al.

    if arm.tree == "3level":
        tree_levels, tree_gamma = p.levels_3, p.gamma_3
    else:
        tree_levels, tree_gamma = p.levels_2, p.gamma_2
    if arm.tree == "default" and levels is not None:
        tree_levels = tuple(levels)
        tree_gamma = None if gamma is None else tuple(gamma)  # None: uniform γ over the new levels
    elif gamma is not None and (arm.tree == "default" or len(tuple(gamma)) == len(tree_levels)):
        tree_gamma = tuple(gamma)
    kw.update(levels=list(tree_levels), gamma=None if tree_gamma is None else [float(g) for g in tree_gamma])
    if arm.rule == "additive":
        kw.update(gamma_lr=p.gamma_lr if gamma_lr is None else float(gamma_lr), decay_rate=p.decay_rate)
    elif gamma_lr is not None:
        kw["gamma_lr"] = float(gamma_lr)  # the γ sweep fixes γ (δ = 0) on any rule
    return kw


def _lr_free_hyperparameters(arm: Arm, p: TaskPreset) -> dict[str, Any]:
    """The settings each learning-rate-free optimizer's README recommends (module docstring)."""
    if arm.name == "prodigy":
        # note: Prodigy's README: safeguard_warmup=True with warm-up or restarts, i.e. whenever a schedule
        # changes its lr; decouple=False makes the decay an L2 term, as the Adam arms' weight_decay is
        return {"lr": 1.0, "weight_decay": p.weight_decay, "decouple": False,
                "safeguard_warmup": uses_schedule(arm, p)}
    if arm.name == "dadapt-adam":
        return {"lr": 1.0, "weight_decay": p.weight_decay}
    if arm.name == "schedulefree-adamw":
        return {"lr": SCHEDULE_FREE_LR, "weight_decay": p.adamw_weight_decay, "warmup_fraction": SCHEDULE_FREE_WARMUP}
    # DoG / LDoG: the README's reps_rel, 1e-4 for models with batch norm (the ResNets)
    return {"lr": 1.0, "reps_rel": 1e-4 if p.model.startswith("resnet") else 1e-6, "weight_decay": p.sgd_weight_decay}


def build_optimizer(arm: Arm, model: nn.Module, hyperparameters: dict[str, Any], *,
                    total_steps: int | None = None) -> Optimizer:
    """Build ``arm``'s optimizer over ``model`` with ``hyperparameters`` (from :func:`arm_hyperparameters`).

    ``warmup_fraction`` (the Schedule-Free arms) becomes ``warmup_steps = round(fraction · total_steps)``, so
    those arms need ``total_steps``, the run's number of optimizer steps."""
    kw = dict(hyperparameters)
    if "levels" in kw:
        kw["levels"] = tuple(kw["levels"])
    if "warmup_fraction" in kw:
        if total_steps is None:
            raise ValueError(f"Invalid total_steps: None; the {arm.name} arm warms up over a fraction of the run, "
                             "so build_optimizer needs total_steps (the run's number of optimizer steps)")
        kw["warmup_steps"] = int(round(kw.pop("warmup_fraction") * total_steps))
    if arm.kind == "baseline":
        return create_baseline(arm.optimizer, model.parameters(), **kw)
    return create_optimizer(model, arm.optimizer, **kw)


def uses_schedule(arm: Arm, preset: TaskPreset) -> bool:
    """True when the preset's step schedule (``sgd_milestones``) applies to ``arm``: the SGD family, Prodigy
    and D-Adapt Adam (never Schedule-Free, whose averaging replaces it, nor DoG, whose averaging does)."""
    return arm.schedule and bool(preset.sgd_milestones)
