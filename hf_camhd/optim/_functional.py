"""The CAM-HD step as functions (``docs/algorithm.md`` §3–§4): one entry point, three implementations.

:func:`camhd_step` runs one optimizer step over the tensors that have a gradient::

    1.   h = g_t ⊙ u_{t-1}: sums per tensor and per unit (+ ∂f/∂γ partials)     each implementation
         ... over whole nodes (one all_reduce when sharded)                       sharding.reduce
    2–3. α of the global / block / layer / unit levels, then γ                     hyper_update (shared)*
    2'.  α of the parameter level, element-wise                                    each implementation
    4.   the combined rate K = −s κ of every tensor (per unit where needed)        combined_rates (shared)*
    5–6. the base direction d_t, θ ← θ + K ⊙ d_t, u_t = −s τ d_t stored            each implementation

The implementations share inputs and outputs (like ``torch.optim.adam``'s ``_single_tensor_adam`` /
``_multi_tensor_adam`` / ``_fused_adam``):

* :func:`_camhd_step_reference` — one tensor at a time, written plainly: the readable statement of the
  algorithm that the tests hold the others to (in float64, on parameters and every piece of state);
* :func:`_camhd_step_multi_tensor` — foreach ops, every per-step number a tensor on the device: no host
  synchronisation and no graph break under ``torch.compile``; compiled (inductor → Triton on CUDA) it is
  the fused path on GPUs (:func:`compiled_multi_tensor_step`);
* :func:`_camhd_step_fused_cpu` — the C kernels of :mod:`hf_camhd.optim._fused`: two passes over memory (the
  sums, then θ and the next direction), and between them (*) steps 2–4 as one C call on the few numbers the
  first pass leaves (:func:`_fused_hyper_step`: the arithmetic of :func:`hyper_update` and
  :func:`combined_rates`, without some eighty tensor operations of a few microseconds each).

Numbers that change every step — the step number ``t``, the scheduler's multiplier ``s`` — are Python
floats in eager mode (read from CPU tensors: no device sync) and 0-d tensors while compiling (so a
compiled step neither breaks its graph nor recompiles when they change).
"""

from __future__ import annotations

import ctypes
import math
import warnings
from array import array
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _fused
from ._state import HyperConfig, HyperState, NodeSums, PartialSums, StepTensors, TreeIndex

IMPLEMENTATIONS = ("reference", "multi_tensor", "fused_cpu", "compiled")


def camhd_step(step: StepTensors, hyper: HyperState, index: TreeIndex, cfg: HyperConfig, rule, t, sharding, *,
               impl: str) -> dict:
    """Steps 1–6 of one CAM-HD step, in place. ``t``: this step's number (1 on the first step).

    Returns diagnostics of the hyper-update (``finite``: whether it was applied, ``G``: ∂f/∂γ, ``sums``:
    the node sums), empty when nothing adapted this step.
    """
    fn = {"reference": _camhd_step_reference, "multi_tensor": _camhd_step_multi_tensor,
          "fused_cpu": _camhd_step_fused_cpu, "compiled": compiled_multi_tensor_step}[impl]
    return fn(step, hyper, index, cfg, rule, t, sharding)


# ------------------------------------------------------------------------------------------ scalars
def value(x):
    """A per-step number for the step's arithmetic: a Python float in eager mode (read from a CPU
    tensor: no device sync), left a tensor while compiling or when it lives on an accelerator."""
    if isinstance(x, Tensor):
        return x if torch.compiler.is_compiling() or x.device.type != "cpu" else x.item()
    return x


def decay_factor(cfg: HyperConfig, t):
    """τ(t) = exp(−r t) for step number ``t`` (1 on the first step); 1 when ``decay_rate`` is 0."""
    if cfg.decay_rate == 0:
        return 1.0
    return torch.exp(-cfg.decay_rate * t) if isinstance(t, Tensor) else math.exp(-cfg.decay_rate * t)


def adapts_now(cfg: HyperConfig, t) -> bool:
    """Whether this step runs the hyper-update at all: something is learned and (in eager mode) this is
    not the first step, where u = 0 and nothing can move. While compiling ``t`` is a tensor: the update
    always runs and masks the first step (see :func:`hyper_update`)."""
    return cfg.adapts and (isinstance(t, Tensor) or t > 1)


def _fill(dst: list[Tensor], values: list) -> None:
    """``dst[i] ← values[i]`` for 0-d tensors, from Python floats or 0-d tensors, without a host round trip."""
    if values and isinstance(values[0], Tensor):
        torch._foreach_copy_(dst, [v.to(device=d.device, dtype=d.dtype).reshape(d.shape) for v, d in zip(values, dst)])
    else:
        torch._foreach_zero_(dst)
        torch._foreach_add_(dst, values)


def _scaled(values: list, s) -> list:
    """``[v · s]`` for Python floats or tensors."""
    return [v * s for v in values]


# ------------------------------------------------------------------------------------------ step 1 helpers
def unit_sums(h: Tensor, unit_dim: int, count: int) -> Tensor:
    """Sum ``h`` over every dimension but ``unit_dim`` → a vector of ``count`` unit sums."""
    if h.ndim == 0:
        return h.reshape(1)
    if h.numel() == 0:  # an empty shard (FSDP2: fewer rows than ranks)
        return h.new_zeros(count)
    if unit_dim == 0:
        return h.reshape(count, -1).sum(1)
    return h.sum(dim=[d for d in range(h.ndim) if d != unit_dim])


def unit_view_shape(shape, unit_dim: int, count: int) -> tuple[int, ...]:
    """The shape that broadcasts a per-unit vector over a tensor of ``shape``."""
    if len(shape) == 0:
        return ()
    out = [1] * len(shape)
    out[unit_dim] = count
    return tuple(out)


def unit_alpha_view(step: StepTensors, i: int) -> Tensor:
    """The unit level's α of the units tensor ``i`` of the step holds (all of them unless sharded)."""
    alpha, start = step.unit_vectors[step.unit_groups[i]]
    lo, hi = step.unit_ranges[i]
    if lo - start < 0 or hi - start > alpha.shape[0]:
        raise RuntimeError(f"CAM-HD: the unit-level α shard [{start}, {start + alpha.shape[0]}) does not cover this "
                           f"rank's units [{lo}, {hi}) of a tensor; the α vector's placement does not match the parameter's")
    return alpha[lo - start:hi - start]


def _vdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a ⊙ b`` as a 0-d tensor (``linalg.vecdot``: a multi-threaded fused reduction on CPU)."""
    return torch.linalg.vecdot(a.reshape(-1), b.reshape(-1))


def _to(x: Tensor, like: Tensor) -> Tensor:
    return x if x.dtype == like.dtype and x.device == like.device else x.to(device=like.device, dtype=like.dtype)


def _home(hyper: HyperState) -> Tensor:
    return hyper.gamma


# ------------------------------------------------------------------------------------------ steps 2–3 (shared)
@dataclass
class HyperUpdate:
    """What the parameter level's element-wise update needs from :func:`hyper_update`."""

    ok: object                  # the hyper-gradient was finite (compiled: and t > 1): a 0-d bool tensor, or a
                                # Python bool when decided on the host
    gamma_param: Tensor | None  # γ_parameter of step t−1 (the γ that produced α*_{t−1}), whatever ``ok``
    diag: dict


def hyper_update(sums: NodeSums, hyper: HyperState, step: StepTensors, index: TreeIndex, cfg: HyperConfig,
                 t) -> HyperUpdate:
    """Steps 2–3 on the node sums: α of every coarse and unit node (clamped to the bounds), then γ.

    Additive rule: α ← α − β_j γ_j Σh; normalized rule: α ← α (1 − β c̄) with c̄ the smoothed cosine of g and u
    over the node (§3.2). Nothing moves when the hyper-gradient is not finite (and the skip is counted in
    ``hyper.skipped``) or, while compiling, on the first step. No host synchronisation. (The parameter level's
    element-wise step 2' is not gated by this: each entry moves where its own g ⊙ u is finite.)
    """
    gamma, levels = hyper.gamma, cfg.levels
    S = sums.tensor                                        # (T, C)
    node = {"global": S.sum(0, keepdim=True)}
    block_of, layer_of = index.nodes_of(step.index)
    for lv, of in (("block", block_of), ("layer", layer_of)):
        if lv in hyper.coarse:
            node[lv] = S.new_zeros(hyper.coarse[lv].shape[0], S.shape[1]).index_add_(0, of, S)
    finite = torch.isfinite(node["global"]).all()
    gamma_param = gamma[cfg.position("parameter")].clone() if "parameter" in levels else None
    if gamma.device.type == "cpu" and not torch.compiler.is_compiling():
        # note: on the host a branch is free: a skipped step changes nothing, and no update needs a mask
        ok = bool(finite)
        hyper.skipped.add_(int(not ok))
        if not ok:
            return HyperUpdate(False, gamma_param, dict(finite=finite, G=None, sums=node))
    else:
        ok = finite & (t > 1) if isinstance(t, Tensor) else finite
        hyper.skipped.add_((~finite).to(hyper.skipped.dtype))
    G = _gamma_gradient(sums, node, hyper, cfg) if cfg.gamma_lr > 0 else None
    for lv, alpha in hyper.coarse.items():                 # step 2
        _new_alpha(alpha, node[lv], hyper.stats.get(lv), index.beta[lv], gamma[cfg.position(lv)], cfg, ok)
    if "unit" in levels and sums.units:
        _new_unit_alphas(sums, step, index, cfg, gamma[cfg.position("unit")], ok)
    if G is not None:                                      # step 3
        update_gamma(hyper, _normalized_gamma_gradient(G, hyper, cfg, ok) if cfg.normalized else G, ok, cfg)
    return HyperUpdate(ok, gamma_param, dict(finite=torch.as_tensor(ok), G=G, sums=node))


def put(dst: Tensor, new: Tensor, ok) -> None:
    """``dst ← new`` where ``ok``: a 0-d bool tensor (a masked update, no host sync), or ``True`` / ``False``
    (decided on the host)."""
    if ok is not False:
        dst.copy_(new if ok is True else torch.where(ok, new, dst))


def on_device(ok, like: Tensor):
    return ok if ok is True else ok.to(like.device)


def _moves(k: Tensor, like: Tensor):
    """Whether the additive parameter-level step ``α_off + k · x`` may be stored: ``k ≠ 0``. A zero coefficient
    (γ_param = 0, or a zero direction scale) leaves the offsets exactly as they are. Decided on the host where ``k``
    is (no masked pass), else a 0-d mask (no host synchronisation, no graph break)."""
    if k.device.type == "cpu" and not torch.compiler.is_compiling():
        return bool(k != 0)
    return (k != 0).to(like.device)


def _new_alpha(alpha: Tensor, sums: Tensor, stats: Tensor | None, beta, gamma_j: Tensor, cfg: HyperConfig,
               ok) -> None:
    """Step 2 for the nodes of one level (``sums``: ``(nodes, C)``), clamped to [alpha_min, alpha_max], in place
    where ``ok``. The normalized rule first folds this step's sums into the smoothed ones (``stats``)."""
    if not cfg.normalized:
        put(alpha, (alpha - beta * (gamma_j * sums[:, 0])).clamp_(cfg.alpha_min, cfg.alpha_max), ok)
        return
    put(stats, stats.lerp(sums.to(stats.dtype), 1.0 - cfg.hypergrad_smoothing), ok)
    put(alpha, (alpha * (1.0 - cfg.hypergrad_lr * cosine(stats))).clamp_(cfg.alpha_min, cfg.alpha_max), ok)


def _new_unit_alphas(sums: NodeSums, step: StepTensors, index: TreeIndex, cfg: HyperConfig, gamma_unit: Tensor,
                     ok) -> None:
    """Step 2 for the unit level: the units of every unit group of the step at once (one :func:`_new_alpha` on
    their concatenation, then each group's α — and smoothed sums — written back), not one group at a time."""
    groups = list(sums.units)
    alphas = [step.unit_vectors[gi][0] for gi in groups]
    rows = []
    for gi, alpha in zip(groups, alphas):
        u, start = sums.units[gi], step.unit_vectors[gi][1]
        rows.append(u if start == 0 and u.shape[0] == alpha.shape[0] else u[start:start + alpha.shape[0]])
    counts = [a.shape[0] for a in alphas]
    alpha = torch.cat(alphas)
    stats = [step.unit_stats[gi] for gi in groups] if cfg.normalized else None
    joined = torch.cat(stats) if stats is not None else None
    beta = index.unit_betas(groups, counts, alpha) if not cfg.normalized else None
    _new_alpha(alpha, torch.cat(rows).to(alpha.device), joined, beta, gamma_unit, cfg, on_device(ok, alpha))
    if ok is not False:
        torch._foreach_copy_(alphas, list(alpha.split(counts)))
        if stats is not None:
            torch._foreach_copy_(stats, list(joined.split(counts)))


def cosine(stats: Tensor) -> Tensor:
    """``Σgu / sqrt(Σg² Σu²)`` per row of ``(rows, 3)`` smoothed sums, in [−1, 1] (0 where a norm is 0)."""
    den = (stats[..., 1] * stats[..., 2]).sqrt()
    return torch.where(den > 0, stats[..., 0] / den, 0.0).clamp_(-1.0, 1.0)  # x / 0 is masked: no error, no sync


def _normalized_gamma_gradient(G: Tensor, hyper: HyperState, cfg: HyperConfig, ok: Tensor) -> Tensor:
    """The normalized rule's ∂f/∂γ: the smoothed G divided by α₀ ‖g‖ ‖u‖ (smoothed, over the model), so that δ
    is dimensionless like β; equal G_j (equal rates) still leave γ where it is."""
    smoothed = hyper.gamma_grad
    put(smoothed, smoothed.lerp(G, 1.0 - cfg.hypergrad_smoothing), ok)
    g_stats = hyper.stats["global"][0]
    scale = cfg.lr * (g_stats[1] * g_stats[2]).sqrt()
    return torch.where(scale > 0, smoothed / scale, 0.0)


def _gamma_gradient(sums: NodeSums, node: dict, hyper: HyperState, cfg: HyperConfig) -> Tensor:
    """``G_j = ∂f/∂γ_j = Σ_n α_j[n] Σ_{p∈n} h_p`` with the α of step t−1 (non-finite entries → 0)."""
    parts = [(hyper.coarse[lv] * node[lv][:, 0]).sum() for lv in cfg.levels if lv in hyper.coarse]
    if "unit" in cfg.levels:
        parts.append(sums.gamma_unit)
    if "parameter" in cfg.levels:  # Σ α h with α = α₀ + offset: α₀ Σh + Σ offset·h
        parts.append(sums.gamma_param + cfg.lr * node["global"][0, 0])
    home = hyper.gamma
    G = torch.stack([_to(x.reshape(()), home) for x in parts])
    return torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)


def update_gamma(hyper: HyperState, G: Tensor, ok: Tensor, cfg: HyperConfig) -> None:
    """Step 3: ``γ' = γ − δ G`` clamped at 0 and renormalised, or a gradient step on the softmax logits.

    Keeps the previous γ when ``ok`` is false, or when every γ'_j ≤ 0. No host sync.
    """
    gamma = hyper.gamma
    if cfg.gamma_update == "softmax":
        logits = hyper.gamma_logits
        grad_c = gamma * (G - (gamma * G).sum())          # ∂f/∂c_j = γ_j (G_j − Σ_k γ_k G_k)
        new_logits = logits - cfg.gamma_lr * grad_c
        new_logits = new_logits - new_logits.max()       # softmax is shift-invariant; keeps logits bounded
        put(logits, new_logits, torch.isfinite(new_logits).all() & ok)
        gamma.copy_(torch.softmax(logits, dim=0))
        return
    proposal = (gamma - cfg.gamma_lr * G).clamp_min(0)
    total = proposal.sum()
    keep = (total > 0) & (total < math.inf)  # finite and positive (False for NaN)
    keep = keep if ok is True else keep & ok
    put(gamma, proposal / torch.where(keep, total, 1.0), keep)


# ------------------------------------------------------------------------------------------ step 4 (shared)
@dataclass
class Rates:
    """Step 4: ``K_i = −s_i (w_i + τ γ_unit (α_unit − α₀) + τ γ_param (α_param − α₀))`` for tensor i.

    ``w = τ (α₀ + Σ_{coarse j} γ_j (α_j[node] − α₀)) + (1 − τ) α_∞`` (one entry per tensor).
    note: α* is formed as α₀ + Σ_j γ_j (α_j − α₀) (equal since Σ γ_j = 1): exactly α₀ while nothing has
    adapted, so hypergrad_lr = gamma_lr = 0 reproduces the base optimizer to the last bit of the rate. The
    parameter level is stored as offsets α − α₀ for the same reason (and for precision).
    """

    w: Tensor
    unit_coef: Tensor | None    # τ γ_unit
    fine_coef: Tensor | None    # τ γ_param
    tau: object


def combined_rates(step: StepTensors, hyper: HyperState, index: TreeIndex, cfg: HyperConfig, t) -> Rates:
    """The pieces of every tensor's combined rate (:class:`Rates`) from the current α and γ."""
    gamma, a0 = hyper.gamma, cfg.lr
    tau = decay_factor(cfg, t)
    block_of, layer_of = index.nodes_of(step.index)
    dev = (gamma[0] * (hyper.coarse["global"][0] - a0)).expand(len(step.index))
    if "block" in hyper.coarse:
        dev = dev + gamma[cfg.position("block")] * (hyper.coarse["block"][block_of] - a0)
    if "layer" in hyper.coarse:
        dev = dev + gamma[cfg.position("layer")] * (hyper.coarse["layer"][layer_of] - a0)
    w = dev + a0
    if cfg.decay_rate:
        w = tau * w + (1.0 - tau) * cfg.alpha_inf
    unit = tau * gamma[cfg.position("unit")] if "unit" in cfg.levels else None
    fine = tau * gamma[cfg.position("parameter")] if "parameter" in cfg.levels else None
    return Rates(w, unit, fine, tau)


def _dense_rate(step: StepTensors, rates: Rates, i: int, a0: float):
    """κ of tensor ``i`` (before −s): ``w_i``, with the unit level per unit and the parameter level per element."""
    kappa = _unit_rate(step, rates, i, rates.w[i], a0) if step.unit_groups is not None else rates.w[i]
    if step.offsets is not None:
        kappa = kappa + rates.fine_coef * step.offsets[i]
    return kappa


def _unit_rate(step: StepTensors, rates: Rates, i: int, w_i, a0: float) -> Tensor:
    """``w_i + τ γ_unit (α_unit − α₀)`` for the units tensor ``i`` holds, shaped to broadcast over it."""
    view = unit_alpha_view(step, i)
    k = torch.addcmul(_to(torch.as_tensor(w_i), view) if isinstance(w_i, Tensor) else torch.full_like(view, w_i),
                      view - a0, _to(rates.unit_coef, view))
    p = step.params[i]
    return k.reshape(unit_view_shape(p.shape, step.unit_dims[i], k.shape[0]))


def _store_dir_scales(scales: list[Tensor], s, tau, rule_scale: list | None) -> None:
    """``u_t = −s_t τ_t · scale · d_t``: the 0-d factors of the stored directions."""
    u = -s * tau
    _fill(scales, [u] * len(scales) if rule_scale is None else _scaled(rule_scale, u))


def _rebuild_directions(step: StepTensors, rule) -> list[bool]:
    """Put the previous directions the state does not keep (``step.dirs[i] is None``: the base rule rebuilds them
    from its own state, :meth:`~hf_camhd.optim.base_rules.BaseRule.previous_directions`) into ``step.dirs``, as
    fresh tensors in the hyper dtype; return which ones were rebuilt (their new directions are not stored)."""
    rebuilt = [d is None for d in step.dirs]
    if any(rebuilt):
        for group, members, _ in step.groups:
            need = [m for m in members if rebuilt[m]]
            if need:
                prev = rule.previous_directions([step.params[m] for m in need], [step.states[m] for m in need], group)
                for m, d in zip(need, prev):
                    step.dirs[m] = _to(d, step.dir_scales[m])
    return rebuilt


# ------------------------------------------------------------------------------------------ reference
def _camhd_step_reference(step: StepTensors, hyper: HyperState, index: TreeIndex, cfg: HyperConfig, rule, t,
                          sharding) -> dict:
    """Steps 1–6 one tensor at a time, with dense per-element rates: the plain statement of the algorithm."""
    home = _home(hyper)
    diag: dict = {}
    _rebuild_directions(step, rule)
    if adapts_now(cfg, t):
        u = [c * d for d, c in zip(step.dirs, step.dir_scales)]                               # 1. h = g ⊙ u
        h = [_to(g, x) * x for g, x in zip(step.grads, u)]
        chans = [[hx] + ([_to(g, x) ** 2, x ** 2] if cfg.normalized else []) for g, x, hx in zip(step.grads, u, h)]
        part = PartialSums(torch.stack([torch.stack([_to(c.sum(), home) for c in ch]) for ch in chans]))
        if step.unit_groups is not None:
            part.unit_rows = [_to(torch.stack([unit_sums(c, step.unit_dims[i], step.unit_ranges[i][1]
                                                         - step.unit_ranges[i][0]) for c in ch], 1), home)
                              for i, ch in enumerate(chans)]
            part.gamma_unit = torch.stack([(_to(unit_alpha_view(step, i), home) * r[:, 0]).sum()
                                           for i, r in enumerate(part.unit_rows)])
        if step.offsets is not None and cfg.gamma_lr > 0:
            part.gamma_param = torch.stack([_to((off * x).sum(), home) for off, x in zip(step.offsets, h)])
        upd = hyper_update(sharding.reduce(part, step, index.unit_count), hyper, step, index, cfg, t)  # 2–3
        if step.offsets is not None:  # 2'. additive α − β_p γ_p h, or α (1 − β sign h), where h is finite
            for off, x in zip(step.offsets, h):
                if cfg.normalized:
                    new = (cfg.lr + off) * (1.0 - cfg.hypergrad_lr * torch.sign(x)) - cfg.lr
                    put(off, _where_finite(x, new.clamp(*cfg.offset_bounds(off.dtype)), off), True)
                else:
                    k = -index.beta_param * _to(upd.gamma_param, off)
                    put(off, _where_finite(x, (off + k * x).clamp(*cfg.offset_bounds(off.dtype)), off),
                        _moves(k, off))
        diag = upd.diag
    rates = combined_rates(step, hyper, index, cfg, t)                                             # 4
    for group, members, s in step.groups:                                                          # 5–6
        rule.prepare_group(group)
        decay = rule.decoupled_decay(group)
        dense = [-s * _to(torch.as_tensor(_dense_rate(step, rates, m, cfg.lr)), step.dir_scales[m]) for m in members]
        if rule.custom_apply:
            pick = lambda xs: [xs[m] for m in members]  # noqa: E731
            out = rule.directions(pick(step.params), pick(step.grads), pick(step.states), group, foreach=False)
            rule.apply(pick(step.params), pick(step.states), group, dense, out)
            for m, d in zip(members, out.d):
                step.dirs[m].copy_(d)
            _store_dir_scales(pick(step.dir_scales), s, rates.tau, out.scale)
            continue
        derive = rule.derives_direction(group)
        for m, k in zip(members, dense):
            p = step.params[m]
            d, _ = rule.direction_reference(p, step.grads[m], step.states[m], group)
            full = d + decay * p if decay else d          # the direction the rate scales (AdamW: + λθ_{t-1})
            if decay:
                p.mul_(1.0 + decay * k)                   # θ (1 + λK) + K q, rounded as torch's AdamW
            p.add_((k * d).to(p.dtype))
            if not derive:
                step.dirs[m].copy_(full)
        # a rebuilt direction comes in the rule's form: u = −s τ · scale · (what previous_directions returns)
        _store_dir_scales([step.dir_scales[m] for m in members], s, rates.tau,
                          rule.derived_scales([step.states[m] for m in members], group) if derive else None)
    return diag


# ------------------------------------------------------------------------------------------ multi-tensor
def _camhd_step_multi_tensor(step: StepTensors, hyper: HyperState, index: TreeIndex, cfg: HyperConfig, rule, t,
                             sharding) -> dict:
    """Steps 1–6 with multi-tensor (foreach) ops; no host synchronisation, no graph break under compile."""
    diag: dict = {}
    rebuilt = [d is None for d in step.dirs]
    if adapts_now(cfg, t):
        _rebuild_directions(step, rule)  # fresh buffers: step 1 may overwrite them, step 5 writes d into them
        part = _partial_sums_multi_tensor(step, cfg, _home(hyper))                                  # 1
        upd = hyper_update(sharding.reduce(part, step, index.unit_count), hyper, step, index, cfg, t)  # 2–3
        if step.offsets is not None:                                                                # 2'
            _parameter_level_multi_tensor(step, upd, index, cfg)
        diag = upd.diag
    rates = combined_rates(step, hyper, index, cfg, t)                                              # 4
    for group, members, s in step.groups:                                                           # 5–6
        pick = lambda xs: [xs[m] for m in members]  # noqa: E731
        params, dirs = pick(step.params), pick(step.dirs)
        rule.prepare_group(group)
        out = rule.directions(params, pick(step.grads), pick(step.states), group, foreach=True, out=dirs)
        base, fine = _multi_tensor_rates(step, rates, members, s, cfg.lr)
        offsets = pick(step.offsets) if step.offsets is not None else None
        if rule.custom_apply:
            rule.apply(params, pick(step.states), group,
                       base if fine is None else [torch.addcmul(b, o, f) for b, o, f in zip(base, offsets, fine)], out)
        else:
            _apply_multi_tensor(params, out, base, fine, offsets)
        for d, old, again in zip(out.d, dirs, pick(rebuilt)):
            if d is not old and not again:
                old.copy_(d)
        _store_dir_scales(pick(step.dir_scales), s, rates.tau, out.scale)
    return diag


def _partial_sums_multi_tensor(step: StepTensors, cfg: HyperConfig, home: Tensor) -> PartialSums:
    """Step 1 with foreach ops. Where the unit or parameter level needs ``g ⊙ d_{t-1}`` element-wise it is
    written into the direction buffers (dead once h is formed), so nothing model-sized is allocated (the
    normalized rule's norms are taken first, from the untouched buffers)."""
    grads, dirs, scales = step.grads, step.dirs, step.dir_scales
    unit = step.unit_groups is not None

    def per_unit(x: Tensor, i: int) -> Tensor:
        return unit_sums(x, step.unit_dims[i], step.unit_ranges[i][1] - step.unit_ranges[i][0])

    if cfg.normalized:  # Σ g², Σ dir² (per unit where needed), before h overwrites the directions
        g_hd = [_to(g, d) for g, d in zip(grads, dirs)]
        if unit:
            norms = [torch.stack([per_unit(g * g, i), per_unit(d * d, i)], 1) for i, (g, d) in enumerate(zip(g_hd, dirs))]
        else:
            norms = [torch.stack([_vdot(g, g), _vdot(d, d)]) for g, d in zip(g_hd, dirs)]
        norms = [n * torch.stack([torch.ones_like(c), c * c]) for n, c in zip(norms, scales)]  # Σ u² = c² Σ dir²
    if unit or step.offsets is not None:
        _mul_mixed(dirs, grads)  # dirs ← g ⊙ d_{t-1}
        rows = [per_unit(x, i) for i, x in enumerate(dirs)] if unit else None
        raw = [r.sum() for r in rows] if unit else [x.sum() for x in dirs]
    else:
        raw = [_vdot(_to(g, d), d) for g, d in zip(grads, dirs)]
    totals = torch._foreach_mul(raw, scales)
    if cfg.normalized:
        totals = [torch.cat([h.reshape(1), n.sum(0) if unit else n]) for h, n in zip(totals, norms)]
    part = PartialSums(torch.stack([_to(x.reshape(-1), home) for x in totals]))
    if unit:
        rows = [r * c for r, c in zip(rows, scales)]
        if cfg.normalized:
            rows = [torch.cat([r.unsqueeze(1), n], 1) for r, n in zip(rows, norms)]
        part.unit_rows = [_to(r.reshape(r.shape[0], cfg.channels), home) for r in rows]
        part.gamma_unit = torch.stack([(_to(unit_alpha_view(step, i), home) * r[:, 0]).sum()
                                       for i, r in enumerate(part.unit_rows)])
    if step.offsets is not None and cfg.gamma_lr > 0:
        gp = torch._foreach_mul([_vdot(off, x) for off, x in zip(step.offsets, dirs)], scales)
        part.gamma_param = torch.stack([_to(x, home) for x in gp])
    return part


def _parameter_level_multi_tensor(step: StepTensors, upd: HyperUpdate, index: TreeIndex, cfg: HyperConfig) -> None:
    """Step 2' with ``g ⊙ d_{t-1}`` in the direction buffers (u = c · d): additive
    ``α_off ← α_off − β_p γ_p c · g ⊙ d``, normalized ``α ← α (1 − β sign(c · g ⊙ d))``; clamped; element-wise,
    where ``g ⊙ d`` is finite (whether or not the rest of the hyper-update was skipped)."""
    coef = -index.beta_param * upd.gamma_param
    for off, x, c in zip(step.offsets, step.dirs, step.dir_scales):
        if cfg.normalized:
            new = torch.addcmul(off, torch.sign(x) * (cfg.lr + off), _to(-cfg.hypergrad_lr * torch.sign(c), off))
            put(off, _where_finite(x, new.clamp_(*cfg.offset_bounds(off.dtype)), off), True)
        else:
            k = _to(coef * c, off)
            put(off, _where_finite(x, torch.addcmul(off, x, k).clamp_(*cfg.offset_bounds(off.dtype)), off),
                _moves(k, off))


def _where_finite(h: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``h`` is finite, else ``old``: a NaN or infinite g ⊙ u leaves its entry's rate as it is."""
    return torch.where(torch.isfinite(h), new, old)


def _multi_tensor_rates(step: StepTensors, rates: Rates, members: list[int], s, a0: float) -> tuple[list, list | None]:
    """Per member tensor: ``base`` (0-d, or per unit) and ``fine`` (multiplies α_param − α₀) of K = −s κ."""
    if step.unit_groups is not None:
        base = [-s * _unit_rate(step, rates, m, rates.w[m], a0) for m in members]
    else:
        w = rates.w[torch.as_tensor(members, device=rates.w.device)] if len(members) != rates.w.shape[0] else rates.w
        base = [_to(k, step.dir_scales[m]) for k, m in zip(list((-s * w).unbind()), members)]
    fine = None if rates.fine_coef is None else [_to(-s * rates.fine_coef, step.dir_scales[m]) for m in members]
    return base, fine


def _apply_multi_tensor(params: list[Tensor], out, base: list, fine: list | None, offsets: list | None) -> None:
    """Step 6: ``θ ← θ + K ⊙ d`` with ``K = base (+ fine · α_off)``; the base rule's per-tensor ``scale`` is folded
    into K (small tensors) rather than into d. With decoupled decay (``d = scale · q + λθ``):
    ``θ ← θ (1 + λK) + K · scale ⊙ q``, rounded as torch's AdamW."""
    q = out.q if out.decay else out.d
    K = base if fine is None else [torch.addcmul(b, off, f) for b, off, f in zip(base, offsets, fine)]
    Kc = K if out.scale is None else [k * c for k, c in zip(K, out.scale)]
    if out.decay:
        _mul_mixed(params, [k * out.decay + 1.0 for k in K])
    _addcmul_mixed(params, q, Kc)


def _mul_mixed(acc: list[Tensor], other: list[Tensor]) -> None:
    """``acc[i] *= other[i]`` in place (``acc`` may be fp32 while ``other`` is bf16, or a broadcast view)."""
    if all(a.dtype == o.dtype and a.shape == o.shape for a, o in zip(acc, other)):
        torch._foreach_mul_(acc, other)
    else:
        for a, o in zip(acc, other):
            a.mul_(o)


def _addcmul_mixed(acc: list[Tensor], t1: list[Tensor], t2: list[Tensor]) -> None:
    """``acc[i] += t1[i] ⊙ t2[i]`` (``t2`` broadcasts; dtypes may differ: computed in the wider one)."""
    if all(a.dtype == x.dtype == y.dtype for a, x, y in zip(acc, t1, t2)):
        torch._foreach_addcmul_(acc, t1, t2)
    else:
        for a, x, y in zip(acc, t1, t2):
            a.add_((x * y).to(a.dtype))


_compiled = None
_compile_failure: str | None = None


def compiled_multi_tensor_step(step: StepTensors, hyper: HyperState, index: TreeIndex, cfg: HyperConfig, rule, t,
                               sharding) -> dict:
    """The multi-tensor step through ``torch.compile`` (inductor: Triton kernels on CUDA, C++ on CPU): the
    foreach ops of each phase fuse into a few kernels. ``t`` and every ``s`` must be 0-d CPU tensors, so
    the compiled graph neither syncs nor recompiles when they change.

    If compiling fails (it fails before the graph runs), a warning says why once and every later step runs
    the multi-tensor implementation eagerly (same results; :func:`compiled_unavailable_reason` says why).
    """
    global _compiled, _compile_failure
    if _compile_failure is None:
        try:
            if _compiled is None:
                _compiled = torch.compile(_camhd_step_multi_tensor, fullgraph=True, dynamic=False)
            return _compiled(step, hyper, index, cfg, rule, t, sharding)
        except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the eager kernels
            _compile_failure = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            warnings.warn(f"hf_camhd: torch.compile of the CAM-HD step failed ({_compile_failure}); using the "
                          "multi-tensor kernels eagerly (same results, slower). Pass fused=False to silence this.",
                          stacklevel=4)
    return _camhd_step_multi_tensor(step, hyper, index, cfg, rule, t, sharding)


def compiled_unavailable_reason() -> str | None:
    """Why the compiled (CUDA fused) implementation cannot run here, or ``None``."""
    if _compile_failure is not None:
        return f"torch.compile of the step failed earlier ({_compile_failure})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this platform"
    from torch.utils._triton import has_triton

    if not has_triton():
        return "Triton is not available (pip install triton)"
    return None


# ------------------------------------------------------------------------------------------ fused CPU
def _camhd_step_fused_cpu(step: StepTensors, hyper: HyperState, index: TreeIndex, cfg: HyperConfig, rule, t,
                          sharding) -> dict:
    """Steps 1–6 with the C kernels of :mod:`hf_camhd.optim._fused`, in two passes over memory: pass A (the sums of
    step 1 from g and the previous direction, the parameter level's step 2', and the base rule's update that
    overwrites the direction) → α / γ and the rates on those few numbers (:func:`_fused_hyper_step`, one C call)
    → pass B (θ ← θ + K ⊙ d). Step 2' can run in pass A because its coefficient is known before the step (γ_param
    of step t−1) and it is element-wise: each entry moves where its own g ⊙ u is finite, whatever Σh turns out to be.
    """
    counts = _unit_counts(step)
    old_scales = _scalars(step.dir_scales)  # u_{t-1}'s factors, before pass A replaces them
    tau, adapt = decay_factor(cfg, t), adapts_now(cfg, t)
    level = _fused_param_level(step, hyper, index, cfg, old_scales, adapt) if step.offsets is not None else None
    passes, levels = [], []  # per group, in step order (a group's members are consecutive)
    for group, members, s in step.groups:                                                           # 1, 2', 5
        pick = lambda xs: [xs[m] for m in members]  # noqa: E731
        rule.prepare_group(group)
        levels.append(level.pick(members) if level is not None else None)
        passes.append(rule.fused_first(pick(step.params), pick(step.grads), pick(step.states), group,
                                       pick(step.dirs), levels[-1], pick(counts), cfg.normalized,
                                       pick(step.dir_scales), -s * tau))
    rows = _joined([a.rows for a in passes]) if counts[0] is not None else None
    sums = passes[0].sums
    for a in passes[1:]:
        sums = sums + a.sums  # (C arrays: joined end to end)
    rates, diag = _fused_hyper_step(step, hyper, index, cfg, t, sums, old_scales, rows, adapt=adapt)  # 2–4
    unit_k = _fused_unit_factors(step, rates, index, cfg.lr) if counts[0] is not None else None
    for (group, members, s), a, lv in zip(step.groups, passes, levels):                            # 6
        k_rows, ka, da, dd = [], [], [], []
        kb, db = ([], []) if level is not None else (None, None)
        fine = -s * rates.fine_coef  # multiplies α_param − α₀ (with a parameter level)
        for m, c in zip(members, a.scale if a.scale is not None else [1.0] * len(members)):
            if counts[m] is not None:  # the unit's rate multiplies ka and da row by row
                k_rows.append(unit_k[m])
                k = 1.0
            else:
                k_rows.append(None)
                k = -s * rates.w[m]
            ka.append(k * c)
            da.append(a.decay * k)
            dd.append(a.decay / c if a.decay else 0.0)
            if level is not None:
                kb.append(fine * c)
                db.append(a.decay * fine)
        _fused.apply_many(a.params, a.dirs, k_rows, ka, da, dd, a.quotients,
                          (lv.offset_list, kb, db) if lv is not None else None)
    return diag


def _fused_param_level(step: StepTensors, hyper: HyperState, index: TreeIndex, cfg: HyperConfig, scales: array,
                       adapt: bool) -> _fused.ParamLevel:
    """Step 2' as pass A takes it: per tensor the coefficient of ``c · g ⊙ dir`` (``u = c · dir``) — additive
    ``−β_p γ_p c`` with γ_p of step t−1, normalized ``β sign(c)`` — or 0 when nothing adapts (then, as at γ_p = 0,
    the offsets stay exactly)."""
    coefs = [0.0] * len(step.offsets)
    if adapt and cfg.normalized:  # α (1 − β sign(c · g ⊙ dir))
        coefs = [cfg.hypergrad_lr * (1.0 if c > 0 else -1.0 if c < 0 else 0.0) for c in scales]
    elif adapt:
        gamma_param = hyper.gamma.tolist()[cfg.position("parameter")]  # (one op, not an index and an item)
        coef = -index.beta_param * gamma_param
        coefs = [c * coef for c in scales]
    bounds = {dtype: cfg.offset_bounds(dtype) for dtype in {o.dtype for o in step.offsets}}
    lo, hi = zip(*(bounds[o.dtype] for o in step.offsets))
    return _fused.ParamLevel(step.offsets, coefs, list(lo), list(hi), cfg.lr)


@dataclass
class FusedRates:
    """Step 4 as the kernels take it: ``w`` of every tensor as Python floats (and :attr:`w_tensor`, a tensor whose
    first T entries are ``w``: for the unit level's per-row factors), ``τ γ_unit`` and ``τ γ_param``
    (:class:`Rates`' fields, read once). ``out``: the C array the hyper-update wrote them to."""

    w: list[float]
    out: array
    dtype: torch.dtype
    unit_coef: float
    fine_coef: float

    @property
    def w_tensor(self) -> Tensor:
        return torch.frombuffer(self.out, dtype=self.dtype)


def _fused_hyper_step(step: StepTensors, hyper: HyperState, index: TreeIndex, cfg: HyperConfig, t, totals: array,
                      scales: array, rows: Tensor | None, *, adapt: bool) -> tuple[FusedRates, dict]:
    """What the torch implementation does between the passes (the node sums of step 1, :func:`hyper_update` when
    ``adapt``, :func:`combined_rates`) in one C call on the host, with the same order of operations and roundings
    (sums of many terms are added in float64): some eighty tiny tensor operations of a few microseconds each
    become one. ``totals``: the kernels' ``T × 4`` sums ``[Σ g·dir, Σ off·g·dir, Σ g², Σ dir²]`` (a float64 C array);
    ``scales``: the factors c of ``u_{t−1} = c · dir`` (ditto); ``rows``: the same sums per unit
    (:func:`_fused_unit_sums`). Its output is a C array too: between the passes every cache is cold, and each
    kind of torch operation then costs some 100 µs.

    Returns the rates and the diagnostics of :func:`hyper_update`."""
    gamma, coarse, stats = hyper.gamma, hyper.coarse, hyper.stats
    n, channels, levels = len(step.params), cfg.channels, len(cfg.levels)
    nodes = [coarse[lv].shape[0] if lv in coarse else 0 for lv in ("block", "layer")]
    size = (1 + sum(nodes)) * channels
    out = array(_ARRAY_CODES[gamma.dtype], bytes(gamma.element_size() * (n + 2 + size + levels)))
    rates_at, sums_at = _fused.address(out), _fused.address(out) + (n + 2) * out.itemsize  # where C writes them
    block_of, layer_of = index.nodes_of(step.index)
    args = _fused.HyperArgs(
        nt=n, channels=channels, levels=levels, adapt=int(adapt), normalized=int(cfg.normalized),
        softmax=int(cfg.gamma_update == "softmax"), decay=int(cfg.decay_rate != 0), n_block=nodes[0], n_layer=nodes[1],
        **{f"pos_{lv}": cfg.levels.index(lv) if lv in cfg.levels else -1 for lv in ("block", "layer", "unit")},
        pos_param=cfg.levels.index("parameter") if "parameter" in cfg.levels else -1,
        totals=_fused.address(totals), scales=_fused.address(scales), block_of=_pointer(block_of),
        layer_of=_pointer(layer_of),
        **{f"alpha_{lv}": _pointer(coarse.get(lv)) for lv in ("global", "block", "layer")},
        **{f"stats_{lv}": _pointer(stats.get(lv)) for lv in ("global", "block", "layer")},
        **{f"beta_{lv}": _pointer(index.beta.get(lv)) for lv in ("global", "block", "layer")},
        gamma=gamma.data_ptr(), gamma_logits=_pointer(hyper.gamma_logits), gamma_grad=_pointer(hyper.gamma_grad),
        skipped=hyper.skipped.data_ptr(), lr=cfg.lr, hypergrad_lr=cfg.hypergrad_lr, gamma_lr=cfg.gamma_lr,
        smoothing_weight=1.0 - cfg.hypergrad_smoothing, alpha_min=cfg.alpha_min, alpha_max=cfg.alpha_max,
        alpha_inf=cfg.alpha_inf, tau=decay_factor(cfg, t), node_sums=sums_at,
        gradient=sums_at + size * out.itemsize,
        rates=rates_at)
    held = _fused_unit_sums(step, rows, scales, gamma, cfg, index, args) if rows is not None and adapt else ()
    moved = _fused.hyper_step(args, gamma.dtype)  # (held: what args points to, alive until here)
    del held
    values = out.tolist()
    rates = FusedRates(values[:n], out, gamma.dtype, values[n], values[n + 1])
    if not adapt:
        return rates, {}

    def diagnostics() -> dict:  # hyper_update's, as views of the C call's output
        written = torch.frombuffer(out, dtype=gamma.dtype)
        node_sums = written[n + 2:n + 2 + size].view(-1, channels).split([1, *nodes])
        sums = {lv: x for lv, x in zip(("global", "block", "layer"), node_sums) if lv in coarse}
        gradient = written[n + 2 + size:n + 2 + size + levels] if moved and cfg.gamma_lr > 0 else None
        return dict(finite=torch.tensor(moved), G=gradient, sums=sums)

    return rates, DeferredDict(diagnostics)


class DeferredDict(Mapping):
    """A read-only dict built on first access: the fused step's diagnostics (a few tensor views, which would cost
    more than the C hyper-update itself if made on every step; usually nobody reads them)."""

    def __init__(self, build):
        self._build, self._data = build, None

    def _get(self) -> dict:
        if self._data is None:
            self._data = self._build()
        return self._data

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _scalars(values: list[Tensor]) -> array:
    """0-d CPU tensors as a float64 C array (read one by one: cheaper than stacking a few dozen)."""
    return array("d", [v.item() for v in values])


_ARRAY_CODES = {torch.float32: "f", torch.float64: "d"}  # the fused hyper-update's dtypes as array typecodes


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _fused_unit_sums(step: StepTensors, rows: Tensor, scales: array, home: Tensor, cfg: HyperConfig,
                     index: TreeIndex, args) -> tuple:
    """The unit level's part of step 1 for :func:`_fused_hyper_step` (which ``args`` it fills in): the kernels'
    per-unit rows of every tensor (end to end) scaled by c (Σ g·u = c Σ g·dir; Σ u² = c² Σ dir²), added into their
    unit groups and, weighted by α_unit, into ∂f/∂γ_unit's part — a few ops for all tensors at once (the fused
    path is never sharded: every tensor is whole). Returns what ``args`` points to (to keep alive)."""
    plan = index.unit_plan(step.unit_groups, _unit_counts(step), rows.device)
    scales = torch.frombuffer(scales, dtype=torch.float64)
    factors = torch.stack([scales, torch.ones_like(scales), scales * scales], 1)[:, :cfg.channels]
    scaled = _to(rows[:, [0, 2, 3][:cfg.channels]] * factors[plan.row_tensor], home)
    alphas = [step.unit_vectors[gi][0] for gi in plan.groups]
    gamma_unit = (_to(_joined(alphas), home)[plan.row_unit] * scaled[:, 0]).sum()
    units = scaled.new_zeros(sum(plan.sizes), scaled.shape[1]).index_add_(0, plan.row_unit, scaled)
    keep = [units, gamma_unit, _fused.pointers(alphas), _fused.c_array(ctypes.c_int64, plan.sizes)]
    args.n_unit_groups, args.unit_sums, args.gamma_unit_part = len(plan.groups), units.data_ptr(), gamma_unit.data_ptr()
    args.unit_alpha, args.unit_sizes = _fused.address(keep[2]), _fused.address(keep[3])
    if cfg.normalized:
        keep.append(_fused.pointers([step.unit_stats[gi] for gi in plan.groups]))
        args.unit_stats = _fused.address(keep[-1])
    else:
        keep.append(index.unit_betas(plan.groups, plan.sizes, home))
        args.unit_beta = keep[-1].data_ptr()
    return tuple(keep)


def _fused_unit_factors(step: StepTensors, rates: FusedRates, index: TreeIndex, a0: float) -> list[Tensor]:
    """Per tensor (units along dim 0, whole: the fused path is never sharded), each unit's
    ``−s_i (w_i + τ γ_unit (α_unit − α₀))`` in float64, as the kernels take it — for all tensors in a handful of
    ops (:func:`_unit_rate`'s arithmetic on the rows of every tensor at once)."""
    plan = index.unit_plan(step.unit_groups, _unit_counts(step), rates.w_tensor.device)
    alpha = _joined([step.unit_vectors[gi][0] for gi in plan.groups])
    k = torch.add(rates.w_tensor[plan.row_tensor], alpha[plan.row_unit] - a0, alpha=rates.unit_coef)
    neg_s = torch.tensor([-x for x in step.lr_scales], dtype=k.dtype, device=k.device)
    return list((k * neg_s[plan.row_tensor]).to(torch.float64).split(plan.counts))


def _unit_counts(step: StepTensors) -> list[int | None]:
    return [hi - lo for lo, hi in step.unit_ranges] if step.unit_groups is not None else [None] * len(step.params)


def _joined(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]
