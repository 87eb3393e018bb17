"""``CAMHDScheduleFreeAdamW``: CAM-HD's learned multi-level rates scaling a Schedule-Free AdamW step.

Schedule-Free (Defazio et al., "The Road Less Scheduled", NeurIPS 2024) replaces the learning-rate schedule
by interpolation and averaging of iterates; CAM-HD learns the rate itself. The two are orthogonal: here the
combined rate κ of every scalar scales the step of Schedule-Free's base sequence z (the rule:
:class:`hf_camhd.optim.base_rules.ScheduleFreeRule`). Like ``schedulefree.AdamWScheduleFree`` it must be told
when training starts and stops: call ``optimizer.train()`` before training and ``optimizer.eval()`` before
every evaluation and every checkpoint (the parameters then hold the average x, the point to evaluate).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..hierarchy import LRTree
from .base_rules import ScheduleFreeRule
from .camhd import _CAMHD_DOC, CAMHDOptimizer
from .validation import check_betas, check_eps, check_nonnegative

__all__ = ["CAMHDScheduleFreeAdamW"]


class CAMHDScheduleFreeAdamW(CAMHDOptimizer):
    __doc__ = """Schedule-Free AdamW with CAM-HD learned learning rates (``docs/algorithm.md`` §2).

    Base step (the parameters hold y; z is the base sequence, x = (y − (1 − β1) z) / β1 the average)::

        d = g / (sqrt(v̂) + ε) + λ y
        y ← y + c (z − y) + K (1 − β1 (1 − c)) d,   z ← z + K d,   K = −s κ · warmup

    with c the Schedule-Free averaging weight (``weight_lr_power``, ``r``, ``warmup_steps`` as in
    ``schedulefree.AdamWScheduleFree``). With ``hypergrad_lr=0, gamma_lr=0`` it is ``AdamWScheduleFree``.
    Call ``train()`` before training and ``eval()`` before evaluating or saving; ``step()`` outside train mode
    raises.

    Example::

        >>> import torch
        >>> from hf_camhd.optim import CAMHDScheduleFreeAdamW
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = CAMHDScheduleFreeAdamW(model, lr=2.5e-3, levels=("global", "layer"))
        >>> opt.train(); model(torch.randn(3, 4)).sum().backward(); opt.step()
        >>> opt.eval()  # parameters now hold the average x: evaluate or save
    """ + _CAMHD_DOC + """
        warmup_steps: linear warmup of the Schedule-Free step over this many steps.
        r: polynomial weighting of the average (``(t)^r``), 0 = none.
        weight_lr_power: the average weighs step t by ``lr_max^weight_lr_power``.
"""

    def __init__(self, params, lr: float = 2.5e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, levels: Sequence[str] | str | None = ("global", "layer"),
                 gamma: Sequence[float] | None = None, hypergrad_lr: float | None = None,
                 gamma_lr: float | None = None, decay_rate: float = 0.0, alpha_inf: float | None = None,
                 hypergrad_scaling: str = "equal", gamma_update: str = "clamp", alpha_min: float = 0.0,
                 alpha_max: float | None = None, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
                 maximize: bool = False, hypergrad_rule: str = "normalized", hypergrad_smoothing: float = 0.9, *,
                 tree: LRTree | None = None, foreach: bool | None = None, fused: bool | None = None):
        betas = check_betas(betas)
        eps = check_eps(eps)
        check_nonnegative("weight_decay", weight_decay)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Invalid warmup_steps value: {warmup_steps!r} (must be an int ≥ 0)")
        check_nonnegative("r", r)
        check_nonnegative("weight_lr_power", weight_lr_power)
        self.rule = ScheduleFreeRule()
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=float(weight_decay), warmup_steps=warmup_steps,
                        r=float(r), weight_lr_power=float(weight_lr_power), train_mode=False, sf_k=0, sf_lr_max=-1.0,
                        sf_weight_sum=0.0, sf_ckp1=0.0, sf_warmup=1.0)
        super().__init__(params, defaults, levels=levels if tree is None else None, gamma=gamma,
                         hypergrad_lr=hypergrad_lr, gamma_lr=gamma_lr, decay_rate=decay_rate, alpha_inf=alpha_inf,
                         hypergrad_scaling=hypergrad_scaling, gamma_update=gamma_update, alpha_min=alpha_min,
                         alpha_max=alpha_max, maximize=maximize, tree=tree, foreach=foreach, fused=fused,
                         hypergrad_rule=hypergrad_rule, hypergrad_smoothing=hypergrad_smoothing)

    def _gather(self, sharding, flat):
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.step: the optimizer is not in train mode. Call optimizer.train() "
                               "before training and optimizer.eval() before every evaluation and checkpoint "
                               "(Schedule-Free keeps the point to evaluate apart from the point it trains at).")
        return super()._gather(sharding, flat)

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters ← the average x (the point to evaluate and save): ``x = y + (1 − 1/β1) (z − y)``."""
        self._switch(train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Parameters ← y, the point Schedule-Free trains at: ``y = x + (1 − β1) (z − x)``."""
        self._switch(train=True)

    def _switch(self, *, train: bool) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            beta1 = group["betas"][0]
            for p in group["params"]:
                z = self.state.get(p, {}).get("z")
                if z is not None:
                    p.lerp_(z.to(p.device), (1 - beta1) if train else (1 - 1 / beta1))
            group["train_mode"] = train
