"""L4 (Rolinek & Martius, NeurIPS 2018): loss-based step-size adaptation on top of Adam or momentum.

Reference: M. Rolínek, G. Martius, "L4: Practical loss-based stepsize adaptation for deep
learning", NeurIPS 2018, https://arxiv.org/abs/1802.05074. The update and every default follow the
authors' TensorFlow reference implementation (github.com/martius-lab/l4-optimizer, ``L4/L4.py``,
classes ``L4General``/``L4Adam``/``L4Mom``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["L4"]

_DIRECTIONS = ("adam", "momentum")
# Settings that describe the single, global L4 step size; every param group must agree on them.
_GLOBAL_KEYS = ("gamma", "gamma0", "tau", "eps")


class L4(Optimizer):
    r"""L4 step-size adaptation: ``L4Adam`` (default) or ``L4Mom``.

    L4 picks, at every step, the step size that would bring the *linearised* loss a fraction
    :math:`\alpha` of the way down to an estimate :math:`\gamma L_{\min}` of the attainable loss.
    With :math:`L_t` the loss of the current mini-batch (given by the closure), :math:`g_t` the
    gradient, and all inner products taken over every parameter of every group:

    .. math::

        L_{\min} &\leftarrow \begin{cases}\gamma_0 L_1 & t = 1\\
                                           \min(L_{\min}, L_t) & t > 1\end{cases}\\
        \hat g_t &= \mathrm{EMA}_{\beta_g}(g)_t / (1-\beta_g^t)
            \qquad\text{(gradient estimate, momentum with } \beta_g\text{)}\\
        d_t &= \begin{cases}
            \hat m_t / (\sqrt{\hat v_t} + \epsilon_{\mathrm{adam}}) & \text{direction = "adam"}\\
            \hat m_t & \text{direction = "momentum"}\end{cases}
            \qquad \hat m_t = \tfrac{m_t}{1-\beta_1^t},\ \hat v_t = \tfrac{v_t}{1-\beta_2^t}\\
        \eta_t &= \alpha\,\frac{L_t - \gamma L_{\min}}{\hat g_t^\top d_t + \epsilon}\\
        \theta_t &= \theta_{t-1} - \eta_t\, d_t\\
        L_{\min} &\leftarrow (1 + 1/\tau)\, L_{\min}
            \qquad\text{(slow forgetting of the minimum seen loss)}

    where :math:`m_t, v_t` are Adam's first and second moment EMAs of :math:`g_t`. With the default
    :math:`\beta_g = \beta_1` the gradient estimate *is* :math:`\hat m_t` (one buffer is shared), so
    :math:`\hat g_t^\top d_t \ge 0`.

    Defaults (the reference implementation's): :math:`\alpha` = ``alpha`` = 0.15 (the paper's
    recommended value; 0.1–0.3 works), :math:`\gamma` = ``gamma`` = 0.9, :math:`\gamma_0` =
    ``gamma0`` = 0.75, :math:`\tau` = ``tau`` = 1000, :math:`\epsilon` = ``eps`` = 1e-12, Adam
    direction with ``betas`` = (0.9, 0.999) (time scales 10 and 1000) and
    :math:`\epsilon_{\mathrm{adam}}` = ``adam_eps`` = 1e-4, gradient-estimate momentum
    :math:`\beta_g` = ``grad_beta`` = 0.9 (time scale 10).

    **The training loop must pass the loss.** Call ``optimizer.step(closure)`` with a closure that
    returns the mini-batch loss (torch convention). The closure may do the usual
    ``zero_grad(); loss = model(...); loss.backward(); return loss``, or, if the gradients are
    already in ``.grad``, simply return the loss already computed (a detached tensor or a float is
    fine)::

        loss = criterion(model(x), y)
        optimizer.zero_grad(); loss.backward()
        optimizer.step(lambda: loss)

    The class attribute :attr:`requires_loss` is ``True`` so a generic training loop can detect
    this. The loss must be a non-negative scalar (L4 treats 0 as a lower bound); a NaN/inf loss
    skips the step entirely (no state changes), as in the PyTorch port of L4. In data-parallel
    training, return the loss averaged over all processes, or each process computes a different
    :math:`\eta_t` and the replicas drift apart.

    ``alpha`` is stored under the param-group key ``"lr"`` so LR schedulers (and loggers reading
    ``group["lr"]``) act on :math:`\alpha`; a param-group dict may set its own ``"lr"`` (or
    ``"alpha"``) to scale :math:`\eta_t` for that group. :math:`L_{\min}` and the step count are
    global and stored in every param group (keys ``"l_min"``, ``"l4_step"``) so that
    :meth:`state_dict` / :meth:`load_state_dict` round-trip them; after each step
    ``group["l4_eta"]`` holds the effective step size :math:`\eta_t` used for that group (``None``
    before the first step).

    L4 has no weight decay: the loss the closure returns is the loss L4 drives down.

    Args:
        params: parameters or param-group dicts (torch convention).
        alpha: fraction :math:`\alpha` of the "optimal" step size (default 0.15).
        direction: ``"adam"`` (L4Adam, default) or ``"momentum"`` (L4Mom).
        betas: Adam's :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``); with
            ``direction="momentum"`` only :math:`\beta_1` (the direction's momentum) is used.
        adam_eps: :math:`\epsilon_{\mathrm{adam}}` in the Adam direction (default 1e-4).
        grad_beta: momentum :math:`\beta_g` of the gradient estimate :math:`\hat g` (default 0.9).
        gamma: :math:`\gamma`, fraction of the minimum seen loss taken as attainable (default 0.9).
        gamma0: :math:`\gamma_0`, :math:`L_{\min}` is initialised to ``gamma0`` times the first loss
            (default 0.75).
        tau: :math:`\tau`, time scale for forgetting the minimum seen loss (default 1000).
        eps: :math:`\epsilon` added to :math:`\hat g^\top d` (default 1e-12).
    """

    requires_loss = True
    """``step`` needs a closure returning the loss: ``optimizer.step(lambda: loss)``."""

    def __init__(
        self,
        params: Iterable[Any],
        alpha: float = 0.15,
        *,
        direction: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-4,
        grad_beta: float = 0.9,
        gamma: float = 0.9,
        gamma0: float = 0.75,
        tau: float = 1000.0,
        eps: float = 1e-12,
    ) -> None:
        if not alpha >= 0.0:
            raise ValueError(f"Invalid alpha: {alpha}")
        if direction not in _DIRECTIONS:
            raise ValueError(f"Invalid direction {direction!r}; expected one of {_DIRECTIONS}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not adam_eps >= 0.0:
            raise ValueError(f"Invalid adam_eps: {adam_eps}")
        if not 0.0 <= grad_beta < 1.0:
            raise ValueError(f"Invalid grad_beta: {grad_beta}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {gamma} (expected 0 <= gamma <= 1)")
        if not 0.0 <= gamma0 <= 1.0:
            raise ValueError(f"Invalid gamma0: {gamma0} (expected 0 <= gamma0 <= 1)")
        if not tau > 0.0:
            raise ValueError(f"Invalid tau: {tau}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps}")
        defaults = dict(lr=alpha, direction=direction, betas=tuple(betas), adam_eps=adam_eps,
                        grad_beta=grad_beta, gamma=gamma, gamma0=gamma0, tau=tau, eps=eps)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ param groups / state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``"alpha"`` is accepted as a synonym of ``"lr"``)."""
        if "alpha" in param_group:
            param_group = dict(param_group)
            alpha = param_group.pop("alpha")
            if "lr" in param_group and param_group["lr"] != alpha:
                raise ValueError("param group sets both 'alpha' and 'lr' (the same setting) to different values")
            param_group["lr"] = alpha
        if param_group.get("direction", self.defaults["direction"]) not in _DIRECTIONS:
            raise ValueError(f"Invalid direction {param_group['direction']!r}; expected one of {_DIRECTIONS}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if len(self.param_groups) > 1:
            first = self.param_groups[0]
            for key in _GLOBAL_KEYS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"L4 has one global step size: param groups must share {key!r} "
                        f"(got {group[key]!r}, first group has {first[key]!r})")
            group["l_min"] = first["l_min"]
            group["l4_step"] = first["l4_step"]
        else:
            group["l_min"] = None
            group["l4_step"] = 0
        group["l4_eta"] = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("l_min", None)
            group.setdefault("l4_step", 0)
            group.setdefault("l4_eta", None)

    @property
    def l_min(self) -> float | None:
        """Current estimate :math:`L_{\\min}` of the minimum loss (``None`` before the first step)."""
        return self.param_groups[0]["l_min"]

    @property
    def last_step_size(self) -> float | None:
        """Effective step size :math:`\\eta_t` of the last step for the first param group."""
        return self.param_groups[0]["l4_eta"]

    # ------------------------------------------------------------------ update
    @staticmethod
    def _estimates(p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (gradient estimate g_hat, direction d) of ``p`` from its (already updated) buffers."""
        beta1, beta2 = group["betas"]
        t = state["step"]
        m_hat = state["exp_avg"] / (1 - beta1 ** t)
        if group["direction"] == "adam":
            v_hat = state["exp_avg_sq"] / (1 - beta2 ** t)
            d = m_hat / v_hat.sqrt_().add_(group["adam_eps"])
        else:
            d = m_hat
        if "grad_avg" in state:
            g_hat = state["grad_avg"] / (1 - group["grad_beta"] ** t)
        else:  # grad_beta == beta1: the gradient estimate is m_hat
            g_hat = m_hat
        return g_hat, d

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one L4 step. ``closure`` is required and must return the (scalar) loss.

        Returns the closure's value.
        """
        if closure is None:
            raise RuntimeError(
                "L4 needs the loss: call optimizer.step(closure) with a closure returning the loss, "
                "e.g. optimizer.step(lambda: loss)")
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise RuntimeError("L4: the closure returned None; it must return the loss")
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(loss_value):
            return loss  # skip: no update, no state change
        if loss_value < 0.0:
            raise ValueError(f"L4 needs a non-negative loss (got {loss_value}); 0 must be a lower bound")

        first = self.param_groups[0]
        gamma, gamma0, tau, eps = (first[k] for k in _GLOBAL_KEYS)
        l_min = gamma0 * loss_value if first["l_min"] is None else min(first["l_min"], loss_value)

        # Pass 1: update the moment buffers and accumulate g_hat . d over all parameters.
        active: list[tuple[torch.Tensor, dict[str, Any]]] = []
        dots: list[torch.Tensor] = []
        multi_device = len({p.device for g in self.param_groups for p in g["params"]}) > 1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("L4 does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["direction"] == "adam":
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["grad_beta"] != beta1:
                        state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                if "exp_avg_sq" in state:
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if "grad_avg" in state:
                    state["grad_avg"].mul_(group["grad_beta"]).add_(grad, alpha=1 - group["grad_beta"])
                g_hat, d = self._estimates(p, state, group)
                if g_hat.dtype in (torch.float16, torch.bfloat16):
                    g_hat, d = g_hat.float(), d.float()
                dots.append(torch.sum(g_hat * d).to(device="cpu" if multi_device else None,
                                                    dtype=torch.float64))
                active.append((p, group))
        if not active:
            return loss  # no gradients: nothing to do

        dot = float(torch.stack(dots).sum())  # the one host sync of the step
        ratio = (loss_value - gamma * l_min) / (dot + eps)

        # Pass 2: theta <- theta - eta_group * d (d recomputed from the buffers, no stored copy).
        for group in self.param_groups:
            group["l4_eta"] = float(group["lr"]) * ratio
        for p, group in active:
            _, d = self._estimates(p, self.state[p], group)
            p.sub_(d.mul_(group["l4_eta"]))

        new_l_min = (1.0 + 1.0 / tau) * l_min
        new_step = first["l4_step"] + 1
        for group in self.param_groups:
            group["l_min"] = new_l_min
            group["l4_step"] = new_step
        return loss
