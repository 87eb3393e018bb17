"""AdaBound (Luo, Xiong, Liu & Sun, ICLR 2019): Adam whose per-coordinate step is clipped to a band
that closes in on an SGD learning rate.

Reference: L. Luo, Y. Xiong, Y. Liu, X. Sun, "Adaptive Gradient Methods with Dynamic Bound of
Learning Rate", ICLR 2019, https://openreview.net/forum?id=Bkg3g2R9FX. The update below follows the
authors' reference PyTorch implementation (github.com/Luolc/AdaBound, ``adabound/adabound.py``),
which is what every published AdaBound comparison runs; it differs from Algorithm 2 of the paper in
using Adam's bias corrections and no extra ``1/sqrt(t)`` factor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["AdaBound"]


class AdaBound(Optimizer):
    r"""AdaBound / AMSBound optimizer.

    For each parameter tensor :math:`\theta` with gradient :math:`g_t` at step :math:`t` (counted
    per tensor from 1), with :math:`\lambda` = ``weight_decay``:

    .. math::

        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \qquad\text{(L2 penalty, coupled)}\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t\\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2)\, g_t^2
              \qquad(\text{AMSBound: } v_t \leftarrow \max(v_{t-1}^{\max}, v_t))\\
        s_t &= \mathrm{lr}\cdot\sqrt{1-\beta_2^t}\,/\,(1-\beta_1^t)\\
        \eta^*_t &= \mathrm{final\_lr}\cdot \mathrm{lr} / \mathrm{base\_lr}\\
        \eta_l(t) &= \eta^*_t\,\bigl(1 - 1/(\gamma t + 1)\bigr),\qquad
        \eta_u(t) = \eta^*_t\,\bigl(1 + 1/(\gamma t)\bigr)\\
        \theta_t &= \theta_{t-1} - \mathrm{clip}\!\bigl(s_t / (\sqrt{v_t} + \epsilon),\
                    \eta_l(t),\ \eta_u(t)\bigr)\odot m_t

    The step starts Adam-like (the band is :math:`[0, \infty)` at ``t=0``) and turns into SGD with
    momentum at rate :math:`\eta^*` as the band closes (``gamma`` sets how fast).

    ``base_lr`` is the group's ``lr`` when the group was added. It is stored in the param group (key
    ``"base_lr"``), so it is saved by :meth:`state_dict` and restored by :meth:`load_state_dict`; an
    LR scheduler that changes ``lr`` therefore scales ``final_lr`` by the same factor, as in the
    reference implementation (which kept ``base_lrs`` outside the state dict).

    Args:
        params: parameters or param-group dicts (torch convention).
        lr: Adam step size :math:`\mathrm{lr}` (default ``1e-3``, as in the paper).
        betas: :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``).
        final_lr: the SGD learning rate :math:`\eta^*` the bounds converge to (default ``0.1``).
        gamma: convergence speed :math:`\gamma` of the bound functions (default ``1e-3``).
        eps: :math:`\epsilon` added to :math:`\sqrt{v_t}` (default ``1e-8``).
        weight_decay: coupled L2 penalty :math:`\lambda` added to the gradient (default ``0``).
        amsbound: use the AMSBound variant (running maximum of :math:`v_t`) (default ``False``).

    ``step(closure)`` follows the torch convention: the closure is optional and, if given, is called
    with gradients enabled and its value returned.
    """

    requires_loss = False
    """AdaBound does not need the loss value in :meth:`step`."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        final_lr: float = 0.1,
        gamma: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsbound: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not final_lr >= 0.0:
            raise ValueError(f"Invalid final learning rate: {final_lr}")
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"Invalid gamma parameter: {gamma} (expected 0 < gamma < 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), final_lr=final_lr, gamma=gamma, eps=eps,
                        weight_decay=weight_decay, amsbound=bool(amsbound))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its current ``lr`` becomes its ``base_lr`` unless one is given."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", group["lr"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsbound", False)
            group.setdefault("base_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one AdaBound step; returns ``closure()`` if a closure is given, else ``None``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            base_lr = float(group["base_lr"])
            # lr schedulers cannot see final_lr, so it follows lr/base_lr (reference behaviour).
            if base_lr > 0.0:
                final_lr = group["final_lr"] * lr / base_lr
            else:  # group created with lr=0: nothing to scale by
                final_lr = group["final_lr"] if lr > 0.0 else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AdaBound does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsbound"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]

                if group["weight_decay"] != 0:
                    grad = grad.add(p, alpha=group["weight_decay"])

                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["amsbound"]:
                    max_exp_avg_sq = state["max_exp_avg_sq"]
                    torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
                    denom = max_exp_avg_sq.sqrt().add_(group["eps"])
                else:
                    denom = exp_avg_sq.sqrt().add_(group["eps"])

                step_size = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                lower = final_lr * (1 - 1 / (group["gamma"] * t + 1))
                upper = final_lr * (1 + 1 / (group["gamma"] * t))

                # update = clip(step_size / denom, lower, upper) * m_t, computed in place in denom
                update = denom.reciprocal_().mul_(step_size).clamp_(lower, upper).mul_(exp_avg)
                p.sub_(update)

        return loss
