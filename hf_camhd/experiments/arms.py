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

``sgdm-camhd`` is accepted for ``sgd-camhd`` and ``l4`` for ``adam-l4``. The HD arms use no decay
(r = 0), as in Baydin et al.; the CAM-HD arms use the preset's r. The SGD-family arms follow the
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

__all__ = ["Arm", "BASELINE_ARMS", "HD_ARMS", "CAMHD_BASES", "resolve_arm", "arm_names", "arm_hyperparameters",
           "build_optimizer", "uses_schedule"]

BASELINE_ARMS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "sgdn": "SGDN", "radam": "RAdam",
                 "adabound": "AdaBound", "adam-l4": "Adam-L4"}
HD_ARMS = {"adam-hd": "Adam-HD", "adamw-hd": "AdamW-HD", "sgd-hd": "SGD-HD", "sgdn-hd": "SGDN-HD"}
CAMHD_BASES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "sgdn": "SGDN"}
_ALIASES = {"l4": "adam-l4", "sgd-nesterov": "sgdn", "sgdm-camhd": "sgd-camhd"}
_CAMHD_RE = re.compile(r"^(adam|adamw|sgd|sgdn|sgdm)-camhd(?:-([23])-?level)?$")


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
    """

    name: str
    display_name: str
    family: str
    kind: str
    optimizer: str
    tree: str | None = None


def arm_names() -> list[str]:
    """Every arm name (the CAM-HD ones with and without the -2level / -3level suffix)."""
    names = list(BASELINE_ARMS) + list(HD_ARMS)
    for base in CAMHD_BASES:
        names += [f"{base}-camhd", f"{base}-camhd-2level", f"{base}-camhd-3level"]
    return names


def resolve_arm(name: str) -> Arm:
    """The :class:`Arm` for ``name`` (case-insensitive, ``_`` accepted for ``-``); unknown names raise ValueError."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in BASELINE_ARMS:
        family = "sgd" if key.startswith("sgd") else "adam"
        return Arm(key, BASELINE_ARMS[key], family, "baseline", key)
    if key in HD_ARMS:
        family = "sgd" if key.startswith("sgd") else "adam"
        return Arm(key, HD_ARMS[key], family, "hd", key, "global")
    m = _CAMHD_RE.match(key)
    if m:
        base = "sgd" if m.group(1) == "sgdm" else m.group(1)
        tree = "default" if m.group(2) is None else f"{m.group(2)}level"
        canonical = f"{base}-camhd" + ("" if m.group(2) is None else f"-{m.group(2)}level")
        display = f"{CAMHD_BASES[base]}-CAM-HD" + ("" if m.group(2) is None else f" ({m.group(2)}-level)")
        return Arm(canonical, display, "sgd" if base.startswith("sgd") else "adam", "camhd", f"{base}-camhd", tree)
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
        if arm.family == "sgd":
            kw: dict[str, Any] = {"lr": p.sgd_lr, "momentum": p.momentum, "weight_decay": p.sgd_weight_decay}
            if arm.name == "sgdn":
                kw["nesterov"] = True
            return kw
        wd = p.adamw_weight_decay if arm.name == "adamw" else p.weight_decay
        return {"lr": p.adam_lr, "weight_decay": wd}

    # note: the paper's arms run the paper's (additive) rule with Table 1's β
    if arm.family == "sgd":
        kw = {"lr": p.sgd_lr, "momentum": p.momentum, "weight_decay": p.sgd_weight_decay,
              "hypergrad_lr": p.sgd_hypergrad_lr, "hypergrad_rule": "additive"}
    else:
        wd = p.adamw_weight_decay if arm.optimizer.startswith("adamw") else p.weight_decay
        kw = {"lr": p.adam_lr, "weight_decay": wd, "hypergrad_lr": p.adam_hypergrad_lr, "hypergrad_rule": "additive"}
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
    kw.update(levels=list(tree_levels), gamma=None if tree_gamma is None else [float(g) for g in tree_gamma],
              gamma_lr=p.gamma_lr if gamma_lr is None else float(gamma_lr), decay_rate=p.decay_rate)
    return kw


def build_optimizer(arm: Arm, model: nn.Module, hyperparameters: dict[str, Any]) -> Optimizer:
    """Build ``arm``'s optimizer over ``model`` with ``hyperparameters`` (from :func:`arm_hyperparameters`)."""
    kw = dict(hyperparameters)
    if "levels" in kw:
        kw["levels"] = tuple(kw["levels"])
    if arm.kind == "baseline":
        return create_baseline(arm.optimizer, model.parameters(), **kw)
    return create_optimizer(model, arm.optimizer, **kw)


def uses_schedule(arm: Arm, preset: TaskPreset) -> bool:
    """True when the preset's step schedule (``sgd_milestones``) applies to ``arm`` (the SGD family)."""
    return arm.family == "sgd" and bool(preset.sgd_milestones)
