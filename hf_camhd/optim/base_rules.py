"""Base direction rules: the d_t that CAM-HD's learned step size multiplies (``docs/algorithm.md`` §2).

A base rule owns the base optimizer's state (moments, momentum buffers) and turns gradients into a
direction ``d_t``; the CAM-HD layer (:mod:`hf_camhd.optim.camhd`) then moves
``θ_t = θ_{t-1} − s_t κ_t ⊙ d_t``. Adding another base (RAdam, AdaBound, Lion) means writing one
:class:`BaseRule` subclass with a reference (per-tensor) and a foreach (multi-tensor) method that
agree, and one optimizer class that picks it.

* SGD: ``d = g`` (+ ``λθ`` with L2 weight decay); momentum ``b = μ b + (1 − dampening) g``, ``d = b``;
  Nesterov ``d = g + μ b``. Matches ``torch.optim.SGD``.
* Adam: ``m̂ / (sqrt(v̂) + ε)`` with L2 decay folded into ``g`` (``torch.optim.Adam``);
  AdamW adds ``λθ_{t-1}`` to ``d`` (decoupled decay; ``torch.optim.AdamW``). ``amsgrad`` as in torch.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _fused


@dataclass
class Directions:
    """What a base rule returns: one direction per tensor, and whether each is a fresh tensor the
    optimizer may keep (``False`` when it aliases a gradient or a state buffer).

    ``scale`` (foreach rules only) says the true direction is ``scale[i] · d[i]`` — a per-tensor
    constant such as Adam's bias correction, folded into the step size instead of costing a pass.
    With decoupled weight decay the true direction is ``scale · q + decay · θ`` (and ``d`` holds it
    divided by ``scale``), so the update can apply the decay multiplicatively,
    ``θ ← θ (1 − sκλ) − sκ · scale · q``, rounded as torch's AdamW.
    """

    d: list[Tensor]
    owned: list[bool]
    q: list[Tensor] | None = None
    decay: float = 0.0
    scale: list[float] | None = None


@dataclass
class PassA:
    """What a rule's fused pass A (:meth:`BaseRule.fused_first`) returns for the hyper-update and for pass B.

    ``sums``: ``[Σ g·dir_old, Σ off·g·dir_old, Σ g², Σ dir_old²]`` per tensor, a float64 C array of ``T × 4``;
    ``rows``: the same per unit, a ``(units, 4)`` tensor with every tensor's units end to end (``None`` without a unit
    level). ``scale``: the per-tensor factor of :class:`Directions` that pass B multiplies the rate by (``None``: 1).
    ``params`` / ``dirs`` / ``quotients``: what pass B moves and the directions it applies, as
    :func:`hf_camhd.optim._fused.apply_many` takes them (``quotients = (ms, vs, shifts)`` where ``dirs[i]`` is
    ``None``: Adam's ``m / (sqrt(v) + shift)``, not kept), the tensor lists as the :class:`~hf_camhd.optim._fused.
    PerTensor` objects pass A took (their pointers are read once per step). ``decay``: decoupled weight decay λ —
    pass B moves ``θ ← θ (1 + λK) + K · scale · dir`` and the stored direction gains ``(λ / scale) θ_old``.
    """

    sums: array
    rows: Tensor | None
    scale: list[float] | None
    params: _fused.PerTensor
    dirs: _fused.TensorList
    quotients: tuple | None = None
    decay: float = 0.0


class BaseRule:
    """Interface of a base direction rule. Subclasses set ``name`` and ``state_keys``."""

    name: str = "base"
    state_keys: tuple[str, ...] = ()
    custom_apply: bool = False
    """Whether the rule moves the parameters itself (:meth:`apply`) instead of ``θ ← θ + K ⊙ d``."""

    def prepare_group(self, group: dict) -> None:
        """Advance per-group counters once per step, before the group's directions (none by default)."""

    def apply(self, params: list[Tensor], states: list[dict], group: dict, rates: list[Tensor],
              out: Directions) -> None:
        """Move the parameters with the combined rates ``K = −s κ`` (``rates[i]`` broadcasts over tensor i) and the
        directions ``out`` (only for rules with ``custom_apply``)."""
        raise NotImplementedError(f"the {self.name} rule applies the update as θ ← θ + K ⊙ d")

    def init_state(self, p: Tensor, state: dict, group: dict) -> None:
        """Create the rule's per-parameter state if absent (called lazily, at the first step)."""

    def directions(self, params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict,
                   *, foreach: bool, out: list[Tensor | None] | None = None) -> Directions:
        """Update the base state and return the directions ``d_t`` (in the parameters' dtype).

        ``out`` (foreach only) offers a free buffer per tensor (``None`` where there is none) that the
        rule writes ``d`` into instead of allocating — no model-sized temporaries in the step.
        """
        if foreach:
            return self.directions_foreach(params, grads, states, group, out)
        out = [self.direction_reference(p, g, s, group) for p, g, s in zip(params, grads, states)]
        decay = self.decoupled_decay(group)
        if decay:
            q = [d for d, _ in out]
            return Directions([d.add(p, alpha=decay) for d, p in zip(q, params)], [True] * len(q), q, decay)
        return Directions([d for d, _ in out], [o for _, o in out])

    def decoupled_decay(self, group: dict) -> float:
        """λ of a decay term ``λθ`` that is part of ``d`` but not of the reference direction (AdamW)."""
        return 0.0

    def derives_direction(self, group: dict) -> bool:
        """Whether the direction of a step with these settings can be rebuilt from the rule's own state at the
        next step (:meth:`previous_directions`), so that CAM-HD need not keep it: one parameter-sized buffer
        less, and one stream less over memory per step. ``False`` by default (the direction is stored)."""
        return False

    def previous_directions(self, params: list[Tensor], states: list[dict], group: dict) -> list[Tensor]:
        """The last step's directions rebuilt from the state (before this step changes it), in the form CAM-HD
        keeps them: ``u_{t-1} = dir_scale · dir`` with the ``scale`` of :class:`Directions` folded into
        ``dir_scale``. Zeros where the rule has not stepped yet. Fresh tensors, in the parameters' dtype."""
        raise NotImplementedError(f"the {self.name} rule keeps its direction")

    def derived_scales(self, states: list[dict], group: dict) -> list[float] | None:
        """The ``scale`` of :class:`Directions` for this step's directions, after the step (``None``: 1): what the
        reference implementation, whose directions carry it, folds into ``dir_scale`` when the direction is
        rebuilt by :meth:`previous_directions` rather than kept."""
        return None

    def direction_reference(self, p: Tensor, g: Tensor, state: dict, group: dict) -> tuple[Tensor, bool]:
        """One tensor's direction (without any decoupled decay) and whether it is a fresh tensor."""
        raise NotImplementedError

    def directions_foreach(self, params, grads, states, group, out=None) -> Directions:
        raise NotImplementedError

    fused_state_keys: tuple[str, ...] | None = None
    """State tensors shaped like the parameter that :meth:`fused_first` reads (``None``: no fused kernel)."""

    def fused_first(self, params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict,
                    dirs: list[Tensor], level, unit_counts: list[int | None], norms: bool, dir_scales: list[Tensor],
                    u_factor: float) -> PassA:
        """The fused CPU pass A (:mod:`hf_camhd.optim._fused`): per tensor, the sums ``[Σ g·dir, Σ off·g·dir, Σ g²,
        Σ dir²]`` of the previous direction (per unit too, with a unit count), the parameter level's offsets
        (``level``, a :class:`~hf_camhd.optim._fused.ParamLevel`, or ``None``), then the base state and the new
        direction written over ``dirs``, and ``dir_scales[i] ← u_factor · scale_i``. Returns the sums and what
        pass B needs (:class:`PassA`)."""
        raise NotImplementedError(f"the {self.name} rule has no fused kernel")


class SGDRule(BaseRule):
    """``torch.optim.SGD``'s direction: plain, momentum (with dampening) or Nesterov, L2 decay."""

    name = "sgd"
    state_keys = ("momentum_buffer",)

    def direction_reference(self, p, g, state, group):
        wd, mu, damp = group["weight_decay"], group["momentum"], group["dampening"]
        owned = False
        if wd != 0:
            g, owned = g.add(p, alpha=wd), True
        if mu == 0:
            return g, owned
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.clone(g).detach()
        else:
            buf.mul_(mu).add_(g, alpha=1 - damp)
        if group["nesterov"]:
            return g.add(buf, alpha=mu), True
        return buf, False

    def directions_foreach(self, params, grads, states, group, out=None):
        wd, mu, damp = group["weight_decay"], group["momentum"], group["dampening"]
        owned = False
        if wd != 0:
            grads, owned = torch._foreach_add(grads, params, alpha=wd), True
        if mu == 0:
            return _into(out, list(grads), owned)
        bufs = [s.get("momentum_buffer") for s in states]
        if all(b is not None for b in bufs):
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads, alpha=1 - damp)
        else:
            for i, (b, g, s) in enumerate(zip(bufs, grads, states)):
                if b is None:
                    bufs[i] = s["momentum_buffer"] = torch.clone(g).detach()
                else:
                    b.mul_(mu).add_(g, alpha=1 - damp)
        if group["nesterov"]:
            d = _into(out, list(grads), owned)
            torch._foreach_add_(d.d, bufs, alpha=mu)  # d = g + μ b (d is a copy, never p.grad)
            return d
        return _into(out, bufs, False)

    def derives_direction(self, group):
        return group["momentum"] != 0 and not group["nesterov"]  # d = b, the momentum buffer

    def previous_directions(self, params, states, group):
        return [s["momentum_buffer"].clone() if "momentum_buffer" in s else torch.zeros_like(p)
                for p, s in zip(params, states)]

    fused_state_keys = ("momentum_buffer",)

    def fused_first(self, params, grads, states, group, dirs, level, unit_counts, norms, dir_scales, u_factor):
        wd, mu, damp = group["weight_decay"], group["momentum"], group["dampening"]
        kind = 0 if mu == 0 else (2 if group["nesterov"] else 1)
        bufs, first = zip(*(self._momentum_buffer(p, s, kind) for p, s in zip(params, states)))
        params = _fused.PerTensor(params)
        sums, rows = _fused.sgd_first(params, grads, dirs, list(bufs), list(first), level, unit_counts, norms, wd,
                                      kind, mu, damp, dir_scales, [u_factor] * len(grads))
        # the directions pass B applies: the kept ones, else the momentum buffers (just updated)
        return PassA(sums, rows, None, params, [b if d is None else d for d, b in zip(dirs, bufs)])

    @staticmethod
    def _momentum_buffer(p: Tensor, state: dict, kind: int) -> tuple[Tensor | None, bool]:
        """The momentum buffer (created empty, to be started as the gradient as torch.optim.SGD's, on first use)."""
        if not kind:
            return None, False
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
            return buf, True
        return buf, False


def _into(out: list[Tensor | None] | None, d: list[Tensor], owned: bool) -> Directions:
    """Directions ``d``, copied into the offered buffers where possible (so the caller owns them)."""
    if out is None:
        out = [None] * len(d)
    res, res_owned = [], []
    for o, x in zip(out, d):
        if o is not None and o.dtype == x.dtype and o.shape == x.shape:
            res.append(o.copy_(x))
            res_owned.append(True)
        elif owned:
            res.append(x)
            res_owned.append(True)
        else:
            res.append(x.clone())
            res_owned.append(True)
    return Directions(res, res_owned)


class AdamRule(BaseRule):
    """Adam's direction ``m̂ / (sqrt(v̂) + ε)``; ``decoupled=True`` adds ``λθ`` (AdamW)."""

    name = "adam"
    state_keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, decoupled: bool = False):
        self.decoupled = decoupled
        self.name = "adamw" if decoupled else "adam"

    def init_state(self, p, state, group):
        if "exp_avg" in state:
            return
        # note: like torch.optim.Adam, `step` is a CPU float tensor, so reading it never syncs a device
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def direction_reference(self, p, g, state, group):
        beta1, beta2 = group["betas"]
        wd, eps = group["weight_decay"], group["eps"]
        state["step"] += 1
        step = float(state["step"])
        if wd != 0 and not self.decoupled:
            g = g.add(p, alpha=wd)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if group["amsgrad"]:
            torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
            v = state["max_exp_avg_sq"]
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        return (m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps), True

    def decoupled_decay(self, group):
        return group["weight_decay"] if self.decoupled else 0.0

    @staticmethod
    def _bias_terms(states: list[dict], group: dict, count: bool = True, previous: bool = False) -> tuple[list, ...]:
        """Count the step (``count``); return per tensor ``scale = sqrt(bc2) / bc1`` and ``shift = ε · sqrt(bc2)``
        at the (new) step count, and with ``previous`` (eager only) the shifts of the step before too.

        note: d = (m / bc1) / (sqrt(v) / sqrt(bc2) + ε) = scale · m / (sqrt(v) + shift): the per-tensor
        constant is folded into the step size instead of costing a pass over the moments. The step counters
        are CPU tensors: read once on the host in eager mode (no device sync), kept as tensors while compiling
        (so the compiled graph does not recompile as they count). Before the first step (count 0) the scale
        is 0 and the shift 1: the rebuilt direction ``0 / (0 + 1)`` is 0.
        """
        beta1, beta2 = group["betas"]
        steps = [s["step"] for s in states]
        if count:
            # note: a tensor 1 on the steps' (CPU) device, as torch's Adam does: one fast multi-tensor add
            torch._foreach_add_(steps, _one(steps[0]), alpha=1.0)
        if torch.compiler.is_compiling():
            values = [s.double() for s in steps]
            bc2_sqrt = [_sqrt(1 - beta2 ** s) for s in values]
            scale = [torch.where(s > 0, b2 / (1 - beta1 ** s), 0.0) for s, b2 in zip(values, bc2_sqrt)]
            return scale, [torch.where(s > 0, group["eps"] * b2, 1.0) for s, b2 in zip(values, bc2_sqrt)]
        values = [s.item() for s in steps]  # (CPU tensors: no sync; faster than stacking them first)
        terms = {}  # per distinct count (usually one per group): (scale, shift)
        for t in set(values) | ({t - 1 for t in values} if previous else set()):
            bc2_sqrt = math.sqrt(1 - beta2 ** t)
            terms[t] = (bc2_sqrt / (1 - beta1 ** t), group["eps"] * bc2_sqrt) if t > 0 else (0.0, 1.0)
        out = ([terms[t][0] for t in values], [terms[t][1] for t in values])
        return (*out, [terms[t - 1][1] for t in values]) if previous else out

    @staticmethod
    def _moments(states: list[dict], group: dict) -> tuple[list[Tensor], list[Tensor]]:
        """``m`` and the ``v`` the quotient divides by (``max_exp_avg_sq`` with amsgrad) of every tensor."""
        return [s["exp_avg"] for s in states], [s["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"]
                                                for s in states]

    @staticmethod
    def _quotient(ms: list[Tensor], vs: list[Tensor], shift: list, out: list[Tensor | None] | None) -> list[Tensor]:
        """``q = m / (sqrt(v) + shift)``, written into the offered buffers when they fit (nothing model-sized is
        allocated then)."""
        usable = out is not None and all(o is not None and o.dtype == m.dtype and o.shape == m.shape
                                         for o, m in zip(out, ms))
        if usable:
            q = list(out)
            for o, v in zip(q, vs):
                torch.sqrt(v, out=o)
            torch._foreach_add_(q, shift)
            for o, m in zip(q, ms):
                torch.div(m, o, out=o)
            return q
        den = torch._foreach_sqrt(vs)
        torch._foreach_add_(den, shift)
        return list(torch._foreach_div(ms, den))

    def derives_direction(self, group):
        return not self.decoupled  # d = m / (sqrt(v) + shift): AdamW's λθ_{t-1} would be lost

    def previous_directions(self, params, states, group):
        _, shift = self._bias_terms(states, group, count=False)
        return self._quotient(*self._moments(states, group), shift, None)

    def derived_scales(self, states, group):
        return self._bias_terms(states, group, count=False)[0]

    def directions_foreach(self, params, grads, states, group, out=None):
        beta1, beta2 = group["betas"]
        wd = group["weight_decay"]
        scale, shift = self._bias_terms(states, group)
        if wd != 0 and not self.decoupled:
            grads = torch._foreach_add(grads, params, alpha=wd)
        ms = [s["exp_avg"] for s in states]
        vs = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
        if group["amsgrad"]:
            vmax = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(vmax, vs)
            vs = vmax
        q = self._quotient(ms, vs, shift, out)
        if wd != 0 and self.decoupled:
            d = [_axpy(x, p, wd / c) for x, p, c in zip(q, params, scale)]
            return Directions(d, [True] * len(q), q, wd, scale)
        return Directions(q, [True] * len(q), scale=scale)

    fused_state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def fused_first(self, params, grads, states, group, dirs, level, unit_counts, norms, dir_scales, u_factor):
        beta1, beta2 = group["betas"]
        scale, shift, prev_shift = self._bias_terms(states, group, previous=True)
        params, dirs = _fused.PerTensor(params), _fused.PerTensor(dirs)
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
        ms, vs, *vmax = (_fused.PerTensor([s[key] for s in states]) for key in keys)
        # dir = q here; with decoupled decay pass B adds (λ / c) θ_old to it (see PassA)
        sums, rows = _fused.adam_first(
            params, grads, dirs, ms, vs, vmax[0] if vmax else None, level, unit_counts, norms,
            0.0 if self.decoupled else group["weight_decay"], beta1, beta2, shift, prev_shift, dir_scales,
            [u_factor * c for c in scale])
        quotients = None
        if any(d is None for d in dirs.values):  # pass B rebuilds q from the moments pass A just updated
            quotients = (ms, vmax[0] if vmax else vs, shift)
        return PassA(sums, rows, scale, params, dirs, quotients, group["weight_decay"] if self.decoupled else 0.0)


_ONES: dict = {}


def _one(like: Tensor) -> Tensor:
    """A 0-d tensor 1 of ``like``'s dtype and device, made once (eager; a fresh one while compiling)."""
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=like.dtype, device=like.device)
    key = (like.dtype, like.device)
    if key not in _ONES:
        _ONES[key] = torch.ones((), dtype=like.dtype, device=like.device)
    return _ONES[key]


def _sqrt(x):
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _axpy(y: Tensor, x: Tensor, a) -> Tensor:
    """``y + a · x`` for a Python float or a 0-d tensor ``a``."""
    return torch.addcmul(y, x, a) if isinstance(a, Tensor) else torch.add(y, x, alpha=a)


class ScheduleFreeRule(BaseRule):
    """Schedule-Free AdamW (Defazio et al., "The Road Less Scheduled", 2024) as a base rule.

    The parameters hold y, the point where gradients are taken, interpolated between the base sequence z and its
    average x (``y = (1 − β1) z + β1 x``); CAM-HD's learned rate κ scales z's step::

        d = g / (sqrt(v / (1 − β2^t)) + ε) + λ y                     (v: EMA of g², as Adam's second moment)
        c = w_t / Σ_{i≤t} w_i,  w = lr_max^p (p = weight_lr_power, lr = group lr × warmup, lr_max its running max)
        y ← y + c (z − y) + K (1 − β1 (1 − c)) d,    z ← z + K d          (K = −s κ · warmup)

    so ``u = ∂y/∂κ = −s τ · warmup · (1 − β1 (1 − c)) · d`` (the ``scale`` of :class:`Directions`). With
    ``hypergrad_lr = gamma_lr = 0`` it is ``schedulefree.AdamWScheduleFree``. The group counters (k, lr_max,
    the weight sum) advance once per group and step (:meth:`prepare_group`).
    """

    name = "schedulefree-adamw"
    state_keys = ("z", "exp_avg_sq")
    custom_apply = True

    def init_state(self, p, state, group):
        if "z" not in state:
            state["z"] = torch.clone(p, memory_format=torch.preserve_format).detach()
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def prepare_group(self, group: dict) -> None:
        k = int(group["sf_k"]) + 1
        warmup = min(1.0, k / group["warmup_steps"]) if group["warmup_steps"] > 0 else 1.0
        lr = float(group["lr"]) * warmup
        group["sf_lr_max"] = max(lr, float(group["sf_lr_max"]))
        weight = (k ** group["r"]) * group["sf_lr_max"] ** group["weight_lr_power"]
        group["sf_weight_sum"] = float(group["sf_weight_sum"]) + weight
        group["sf_ckp1"] = weight / group["sf_weight_sum"] if group["sf_weight_sum"] else 0.0
        group["sf_warmup"] = warmup
        group["sf_k"] = k

    def _scale(self, group: dict) -> float:
        return group["sf_warmup"] * (1.0 - group["betas"][0] * (1.0 - group["sf_ckp1"]))

    def direction_reference(self, p, g, state, group):
        beta2 = group["betas"][1]
        v = state["exp_avg_sq"]
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        d = g / ((v / (1 - beta2 ** group["sf_k"])).sqrt() + group["eps"])
        return (d.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else d), True

    def directions(self, params, grads, states, group, *, foreach, out=None):
        if not foreach:
            d = [self.direction_reference(p, g, s, group)[0] for p, g, s in zip(params, grads, states)]
        else:
            beta2 = group["betas"][1]
            vs = [s["exp_avg_sq"] for s in states]
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
            den = torch._foreach_div(vs, 1 - beta2 ** group["sf_k"])
            torch._foreach_sqrt_(den)
            torch._foreach_add_(den, group["eps"])
            d = list(torch._foreach_div(grads, den))
            if group["weight_decay"]:
                torch._foreach_add_(d, params, alpha=group["weight_decay"])
        return Directions(d, [True] * len(d), scale=[self._scale(group)] * len(d))

    def apply(self, params: list[Tensor], states: list[dict], group: dict, rates: list[Tensor], out: Directions) -> None:
        """``y ← y + c (z − y) + K (1 − β1 (1 − c)) d`` and ``z ← z + K d`` with ``K = rates · warmup``."""
        c, warmup, beta1 = group["sf_ckp1"], group["sf_warmup"], group["betas"][0]
        zs = [s["z"] for s in states]
        torch._foreach_lerp_(params, zs, c)
        for p, z, k, d in zip(params, zs, rates, out.d):
            step = (k * warmup) * d
            p.add_((step * (1.0 - beta1 * (1.0 - c))).to(p.dtype))
            z.add_(step.to(z.dtype))
