"""Argument checks shared by every CAM-HD optimizer, worded like torch.optim's.

Each check raises ``ValueError`` naming the argument and the value (and the fix where there is one),
e.g. ``Invalid hypergrad_lr value: -1.0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

GAMMA_UPDATES = ("clamp", "softmax")
HYPERGRAD_SCALINGS = ("equal", "sum")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_nonnegative(name: str, value, *, label: str | None = None) -> float:
    """``value`` must be a finite number ≥ 0 (a Python number)."""
    if isinstance(value, torch.Tensor):
        raise ValueError(f"Invalid {label or name}: {name} must be a Python float, got a Tensor ({value!r}); "
                         f"pass float({name})")
    what = label or (name + " value")
    if not _is_number(value):
        raise ValueError(f"Invalid {what}: {value!r} (a {type(value).__name__}); expected a float ≥ 0")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {what}: {value} (must be a finite number ≥ 0)")
    return float(value)


def check_lr(lr) -> float:
    """The initial learning rate α₀ must be > 0: it is the starting value of every α.

    A 0-d Tensor is accepted, as ``torch.optim`` does, so that a scheduler changing it does not recompile a
    compiled step (``group["lr"]`` stays that tensor; α₀ is its value at construction)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.is_complex() or lr.dtype == torch.bool:
            raise ValueError(f"Invalid learning rate: a Tensor lr must hold one real number, got shape "
                             f"{tuple(lr.shape)} and dtype {lr.dtype}")
        lr = float(lr.detach().cpu())
    if not _is_number(lr):
        raise ValueError(f"Invalid learning rate: {lr!r} (a {type(lr).__name__}); expected a float > 0")
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"Invalid learning rate: {lr} (must be a finite number > 0)")
    lr = float(lr)
    if lr == 0:
        raise ValueError("Invalid learning rate: 0.0 (CAM-HD needs lr > 0: it is the initial value α₀ of every "
                         "learned rate; scale steps to zero with a scheduler instead)")
    return lr


def check_flag(name: str, value) -> bool | None:
    """An implementation switch: ``True``, ``False`` or ``None`` (the default choice)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; expected True, False or None")
    return value


def check_bool(name: str, value) -> bool:
    """An on/off option (``maximize``, ``nesterov``, ``amsgrad``)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; expected True or False")
    return value


def check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not _is_number(b) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b} (each beta must be in [0, 1))")
    return float(betas[0]), float(betas[1])


def check_eps(eps) -> float:
    if not _is_number(eps) or not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps} (must be a float ≥ 0)")
    return float(eps)


def check_momentum(momentum, dampening, nesterov) -> None:
    check_nonnegative("momentum", momentum)
    check_nonnegative("dampening", dampening)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Invalid nesterov: Nesterov momentum requires a momentum and zero dampening "
                         f"(got momentum={momentum}, dampening={dampening})")


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_gamma(gamma, levels: Sequence[str], gamma_update: str) -> list[float]:
    """Initial combination weights: one per level, ≥ 0, not all 0; normalised to sum to 1.

    ``None`` gives uniform weights. With ``gamma_update="softmax"`` every weight must be > 0
    (the logits are ``log γ``).
    """
    n = len(levels)
    if gamma is None:
        return [1.0 / n] * n
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.detach().flatten().tolist()
    if _is_number(gamma):
        gamma = [gamma]
    if isinstance(gamma, str):  # "0.4,0.3,0.3", as levels accept "global,layer,parameter"
        try:
            gamma = [float(x) for x in gamma.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"Invalid gamma: {gamma!r}; expected one number per level, e.g. (0.5, 0.5) or "
                             "'0.5,0.5'") from None
    gamma = list(gamma)
    if len(gamma) != n:
        raise ValueError(f"Invalid gamma: must have one weight per level ({n} levels: {', '.join(levels)}), "
                         f"got {len(gamma)}")
    for j, g in enumerate(gamma):
        if not _is_number(g) or not math.isfinite(g) or g < 0:
            raise ValueError(f"Invalid gamma: weight {j} (level {levels[j]!r}) is {g}; weights must be finite and ≥ 0")
        if gamma_update == "softmax" and g == 0:
            raise ValueError(f"Invalid gamma: weight {j} (level {levels[j]!r}) is 0, but gamma_update='softmax' "
                             "needs every weight > 0 (the logits are log(gamma))")
    total = float(sum(gamma))
    if total <= 0:
        raise ValueError(f"Invalid gamma: {gamma} sums to 0; at least one weight must be > 0")
    return [float(g) / total for g in gamma]


def check_alpha_bounds(alpha_min, alpha_max, lr: float) -> tuple[float, float]:
    """Floor and ceiling of every learned rate; ``alpha_max=None`` means ``1000 * lr``."""
    alpha_min = check_nonnegative("alpha_min", alpha_min)
    if alpha_max is None:
        alpha_max = 1000.0 * lr
    if not _is_number(alpha_max) or math.isnan(alpha_max) or alpha_max <= alpha_min:
        raise ValueError(f"Invalid alpha_max value: {alpha_max} (must be > alpha_min={alpha_min})")
    if lr > alpha_max:
        raise ValueError(f"Invalid alpha_max value: {alpha_max} (below lr={lr}; the learned rates start at lr)")
    if lr < alpha_min:
        raise ValueError(f"Invalid alpha_min value: {alpha_min} (above lr={lr}; the learned rates start at lr)")
    return alpha_min, float(alpha_max)
