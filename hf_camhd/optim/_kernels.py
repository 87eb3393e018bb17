"""The CAM-HD step-size layer (spec §3–§4) as two kernels with identical inputs and outputs.

``_camhd_step_foreach`` is the fast path (multi-tensor ops, no host synchronisation, node sums per
tensor without concatenating the model); ``_camhd_step_reference`` is the same maths written plainly,
one tensor at a time, and is what the tests hold the fast path to (in float64, on params and state).

Both run in two phases around the base rule:

* :func:`hyper_update_*` — given ``g_t`` and the stored previous direction (``u_{t-1} = scale · dir``),
  computes ``h = g ⊙ u``, every level's node sums, updates α (step 2), γ (step 3), and returns for
  every tensor the multiplier ``K = −s_t κ_t`` (step 4; a 0-d tensor, a per-unit view or a full tensor);
* :func:`apply_update_*` — ``θ ← θ + K ⊙ d_t`` and stores ``d_t`` as the next ``dir`` (step 6).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class HyperConfig:
    """The CAM-HD hyper-parameters (Python numbers; see the optimizer docstring)."""

    levels: tuple[str, ...]
    lr: float
    hypergrad_lr: float
    gamma_lr: float
    decay_rate: float
    alpha_inf: float
    hypergrad_scaling: str
    gamma_update: str
    alpha_min: float
    alpha_max: float

    @property
    def adapts(self) -> bool:
        return self.hypergrad_lr > 0 or self.gamma_lr > 0


@dataclass
class StepInputs:
    """The tensors taking part in one step (those with a gradient), in optimizer order."""

    index: list[int]                 # tree entry of each tensor
    params: list[Tensor]
    grads: list[Tensor]
    dirs: list[Tensor]               # previous direction, hyper dtype; u_{t-1} = dir_scale * dir
    dir_scales: list[Tensor]         # 0-d: −s_{t-1} τ_{t-1} (× the base rule's scale of that step)
    lr_scales: list[float]           # s_t = group["lr"] / lr of the tensor's group
    unit_groups: list[int] = field(default_factory=list)     # unit group of each tensor
    unit_alphas: dict[int, Tensor] = field(default_factory=dict)  # α vector of each touched unit group
    param_offsets: list[Tensor | None] = field(default_factory=list)  # α_parameter − α₀ per element
    shard: Any = None  # a distributed.ShardPlan when parameters are sharded (FSDP2); None: every tensor is whole


@dataclass
class PartialSums:
    """Pass 1 of the fused path (:func:`hf_camhd.optim._fused.partial_sums`), unscaled (``u = scale · dir``)."""

    totals: Tensor                          # (T, 2) float64: Σ g ⊙ dir, Σ α_offset ⊙ g ⊙ dir per tensor
    unit_rows: list[Tensor] | None = None   # Σ g ⊙ dir per unit (units along dim 0), per tensor


@dataclass
class HyperState:
    """Views of the model-wide hyper-state (tensors living in ``param_groups[0]``)."""

    gamma: Tensor
    coarse: dict[str, Tensor]           # "global" / "block" / "layer" -> α vector
    gamma_logits: Tensor | None = None  # softmax option


@dataclass
class TreeIndex:
    """Static per-tree tensors on one device: node indices of each entry and per-node β factors."""

    block_of: Tensor | None
    layer_of: Tensor | None
    beta: dict[str, Tensor]             # level -> β_j per node (coarse levels: vector; unit: per group)
    beta_unit: list[float]              # β for each unit group (all units of a group have one size)
    beta_param: float
    unit_count: list[int]
    unit_dims: list[int]                # unit dim of each entry within its unit group
    _present_cache: dict = field(default_factory=dict)

    def present(self, index: list[int]) -> tuple[Tensor | None, Tensor | None]:
        key = tuple(index)
        hit = self._present_cache.get(key)
        if hit is None:
            if len(self._present_cache) > 64:
                self._present_cache.clear()
            idx = torch.tensor(index, dtype=torch.long)
            dev = (self.block_of if self.block_of is not None else self.layer_of)
            dev = dev.device if dev is not None else torch.device("cpu")
            idx = idx.to(dev)
            hit = (self.block_of[idx] if self.block_of is not None else None,
                   self.layer_of[idx] if self.layer_of is not None else None)
            self._present_cache[key] = hit
        return hit


def build_tree_index(tree, cfg: HyperConfig, device: torch.device, dtype: torch.dtype) -> TreeIndex:
    """β per node (spec §4: ``β·N/N_n`` for ``"equal"``, ``β`` for ``"sum"``) and node indices."""
    beta, n_total = cfg.hypergrad_lr, tree.total_numel
    equal = cfg.hypergrad_scaling == "equal"

    def scaled(sizes):
        return torch.tensor([beta * n_total / s if equal else beta for s in sizes], dtype=dtype, device=device)

    betas = {"global": scaled([n_total])}
    block_of = layer_of = None
    if "block" in cfg.levels:
        betas["block"] = scaled(tree.block_sizes)
        block_of = torch.tensor(tree.entry_block, dtype=torch.long, device=device)
    if "layer" in cfg.levels:
        betas["layer"] = scaled(tree.layer_sizes)
        layer_of = torch.tensor(tree.entry_layer, dtype=torch.long, device=device)
    beta_unit = [beta * n_total / g.size if equal else beta for g in tree.unit_groups]
    unit_dims = [0] * len(tree.entries)
    for g in tree.unit_groups:
        for m, dim in g.members:
            unit_dims[m] = dim
    return TreeIndex(block_of, layer_of, betas, beta_unit, beta * n_total if equal else beta,
                     [g.count for g in tree.unit_groups], unit_dims)


# ------------------------------------------------------------------------------------------ helpers
def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def unit_sums(h: Tensor, unit_dim: int, count: int) -> Tensor:
    """Sum ``h`` over everything but its unit dimension → a vector of ``count`` unit sums."""
    if h.ndim == 0:
        return h.reshape(1)
    if h.numel() == 0:  # an empty shard (FSDP2: fewer rows than ranks)
        return h.new_zeros(count)
    if unit_dim == 0:
        return h.reshape(count, -1).sum(1)
    return h.sum(dim=[d for d in range(h.ndim) if d != unit_dim])


def unit_view_shape(shape: torch.Size | tuple, unit_dim: int, count: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-unit vector over a tensor of ``shape``."""
    if len(shape) == 0:
        return ()
    out = [1] * len(shape)
    out[unit_dim] = count
    return tuple(out)


def offset_bounds(cfg: HyperConfig, dtype: torch.dtype) -> tuple[float, float]:
    """Bounds of a stored offset α − α₀ such that α₀ + offset, evaluated in ``dtype``, stays within
    [alpha_min, alpha_max] (α₀ rounded to ``dtype`` first, so α = alpha_min is exact)."""
    return _offset_bounds(cfg.lr, cfg.alpha_min, cfg.alpha_max, dtype)


@functools.lru_cache(maxsize=16)
def _offset_bounds(lr: float, lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float]:
    a0 = torch.tensor(lr, dtype=dtype)
    return float(torch.tensor(lo, dtype=dtype) - a0), float(torch.tensor(hi, dtype=dtype) - a0)


def tau_at(cfg: HyperConfig, step: int) -> float:
    """τ for the step that follows ``step`` completed steps: ``exp(−r · step)`` (1 on the first step)."""
    return math.exp(-cfg.decay_rate * step) if cfg.decay_rate > 0 else 1.0


def _update_gamma(hs: HyperState, G: Tensor, finite: Tensor, cfg: HyperConfig) -> None:
    """Step 3: ``γ' = γ − δ G``, clamped at 0 and renormalised (or the softmax-logit update).

    Keeps the previous γ when the hyper-gradient is non-finite or every γ'_j ≤ 0. No host sync.
    """
    gamma = hs.gamma
    if cfg.gamma_update == "softmax":
        logits = hs.gamma_logits
        grad_c = gamma * (G - (gamma * G).sum())          # ∂f/∂c_j = γ_j (G_j − Σ_k γ_k G_k)
        new_logits = logits - cfg.gamma_lr * grad_c
        new_logits = new_logits - new_logits.max()       # softmax is shift-invariant; keeps logits bounded
        ok = finite & torch.isfinite(new_logits).all()
        logits.copy_(torch.where(ok, new_logits, logits))
        gamma.copy_(torch.softmax(logits, dim=0))
        return
    proposal = (gamma - cfg.gamma_lr * G).clamp_min(0)
    total = proposal.sum()
    ok = finite & torch.isfinite(total) & (total > 0)
    gamma.copy_(torch.where(ok, proposal / torch.where(ok, total, torch.ones_like(total)), gamma))


# ------------------------------------------------------------------------------------------ foreach
@dataclass
class Rates:
    """Step 4's output: per tensor ``K = −s κ = a (+ unit view) (+ b · α_param)``.

    ``base[i]`` is ``a`` as a 0-d tensor, or ``a + b_unit · α_unit`` as a per-unit view; ``fine[i]`` is ``b``
    of the parameter level (0-d tensor, or a Python float when the hyper-state is on the host).
    """

    base: list[Tensor]
    fine: list | None = None


def hyper_update_foreach(inp: StepInputs, hs: HyperState, tix: TreeIndex, cfg: HyperConfig,
                         step: int, diag: dict | None = None, *, host: bool = False,
                         partials: PartialSums | None = None) -> list[float] | None:
    """Steps 1–3 on all tensors at once: node sums of h, α (every level) and γ, in place.

    The previous-direction buffers ``inp.dirs`` may be overwritten (with ``g ⊙ dir``): they are dead
    once h is formed. ``host=True`` (the hyper-state is on the CPU) reads scalars as Python numbers —
    there is no device to synchronise with — which lets the per-element update be one fused op and
    a non-finite hyper-gradient skip the update with a branch; ``host=False`` never leaves the device.

    ``partials`` (the fused path's pass 1; host only, not sharded): the per-tensor (and per-unit) sums, so
    nothing here reads a model-sized tensor. The parameter level's element update is then left to the fused pass 2 and
    returned as one coefficient ``c`` per tensor (``α_offset ← clamp(α_offset + c · g ⊙ dir)``), or ``None``
    when α does not move this step. Without ``partials`` the return value is always ``None``.
    """
    if not (cfg.adapts and step > 0) or not inp.params:
        return None
    levels = cfg.levels
    has_unit, has_param = "unit" in levels, "parameter" in levels
    gamma = hs.gamma
    home, hd = gamma.device, gamma.dtype
    lo, hi = cfg.alpha_min, cfg.alpha_max
    pos = {lv: i for i, lv in enumerate(levels)}
    grads = [local(g) for g in inp.grads]
    dirs = [local(d) for d in inp.dirs]
    gamma_old = gamma.tolist() if host else None
    # h' = g ⊙ dir is materialised (in the dir buffers) only when something needs it element-wise
    need_h = partials is None and (has_unit or (has_param and (not host or cfg.gamma_lr > 0)))
    unit_raw: list[Tensor] = []
    plan = inp.shard
    if partials is not None:
        if plan is not None or not host or (has_unit and partials.unit_rows is None):
            raise ValueError("partial sums are for the fused path: host scalars, not sharded, unit sums with a unit level")
        scales64 = torch.stack(inp.dir_scales).to(torch.float64)
        unit_raw = partials.unit_rows if has_unit else []
    elif need_h:
        _foreach_mul_mixed(dirs, grads)
        if has_unit:
            unit_raw = [unit_sums(x, tix.unit_dims[e], tix.unit_count[inp.unit_groups[i]] if plan is None
                                  else plan.unit_ranges[i][1] - plan.unit_ranges[i][0])
                        for i, (x, e) in enumerate(zip(dirs, inp.index))]
            raw = [r.sum() for r in unit_raw]
        else:
            raw = [x.sum() for x in dirs]
    else:
        raw = [_vdot(_as(g, d.dtype), d) for g, d in zip(grads, dirs)]
    # per-tensor Σ h = scale · Σ g ⊙ dir
    if partials is not None:
        S = (partials.totals[:, 0] * scales64).to(device=home, dtype=hd)
    else:
        S = torch.stack([x.to(device=home, dtype=hd) for x in torch._foreach_mul(raw, inp.dir_scales)])
    if plan is not None:  # sharded: local partial sums → one all_reduce (spec §3)
        S, unit_tot, g_unit, g_param = _reduce_partials(inp, plan, tix, cfg, S, unit_raw, dirs, home, hd)
    finite = torch.isfinite(S.sum())
    if host and not bool(finite):
        if diag is not None:
            diag.update(sums=None, finite=finite, G=None)
        return None

    sums: dict[str, Tensor] = {"global": S.sum().reshape(1)}
    block_of, layer_of = tix.present(inp.index)
    if "block" in hs.coarse:
        sums["block"] = torch.zeros_like(hs.coarse["block"]).index_add_(0, block_of, S)
    if "layer" in hs.coarse:
        sums["layer"] = torch.zeros_like(hs.coarse["layer"]).index_add_(0, layer_of, S)
    if plan is None:
        unit_tot: dict[int, Tensor] = {}
        for i, r in enumerate(unit_raw):
            gi = inp.unit_groups[i]
            r = (r * inp.dir_scales[i]).to(device=home, dtype=hd)
            unit_tot[gi] = unit_tot[gi] + r if gi in unit_tot else r

    G = None
    if cfg.gamma_lr > 0:  # G_j = Σ_n α_j^old[n] Σ_{p∈n} h_p, before α moves
        parts = [(hs.coarse[lv] * sums[lv]).sum() for lv in levels if lv in hs.coarse]
        if has_unit:
            parts.append(g_unit if plan is not None else
                         torch.stack([(inp.unit_alphas[gi] * u).sum() for gi, u in unit_tot.items()]).sum())
        if has_param:
            # Σ α h with α = α₀ + offset: α₀ Σh + Σ offset·h
            if partials is not None:
                g_param = (partials.totals[:, 1] * scales64).sum()
            elif plan is None:
                gp = [_vdot(local(a), x) for a, x in zip(inp.param_offsets, dirs)]
                gp = torch._foreach_mul(gp, inp.dir_scales)
                g_param = torch.stack([x.to(home) for x in gp]).sum()
            parts.append(g_param + cfg.lr * sums["global"][0])
        G = torch.stack([x.to(device=home, dtype=hd).reshape(()) for x in parts])
        G = torch.where(torch.isfinite(G), G, torch.zeros_like(G))

    for lv, alpha in hs.coarse.items():  # step 2: α ← α − β_j γ_j Σh (clamped; kept if h is non-finite)
        new = (alpha - tix.beta[lv] * (gamma[pos[lv]] * sums[lv])).clamp_(lo, hi)
        alpha.copy_(new if host else torch.where(finite, new, alpha))  # host: a non-finite h returned above
    if has_unit:
        g_u = gamma[pos["unit"]]
        for gi, u in unit_tot.items():
            alpha = local(inp.unit_alphas[gi])
            if plan is not None:  # this rank's α shard (or the whole vector when replicated)
                start = plan.alpha_lo[gi]
                u = u[start:start + alpha.shape[0]]
            new = (alpha - (tix.beta_unit[gi] * g_u) * u.to(alpha.device)).clamp_(lo, hi)
            alpha.copy_(torch.where(finite.to(alpha.device), new, alpha))
    coefs = None
    if has_param:
        alphas = [local(a) for a in inp.param_offsets]
        if host:
            scales = (scales64 if partials is not None else torch.stack(inp.dir_scales)).tolist()
            coefs = [-tix.beta_param * gamma_old[pos["parameter"]] * sc for sc in scales]
            if need_h:   # h' is in the dir buffers
                for a, x, c in zip(alphas, dirs, coefs):
                    a.add_(x, alpha=c)
            elif partials is None:  # one fused pass: α ← α + c · g ⊙ dir (with partials: pass 2 does it)
                _foreach_addcmul_mixed(alphas, dirs, grads, coefs)
        else:
            for x in dirs:  # a non-finite h' would turn the masked update below into NaN
                torch.nan_to_num_(x, nan=0.0, posinf=0.0, neginf=0.0)
            coef = gamma[pos["parameter"]] * (-tix.beta_param) * finite.to(hd)
            coefs = torch._foreach_mul([coef] * len(dirs), inp.dir_scales)
            torch._foreach_addcmul_(alphas, dirs, [c.to(a.device) for c, a in zip(coefs, alphas)])
        if partials is None:
            for a in alphas:
                a.clamp_(*offset_bounds(cfg, a.dtype))
    if G is not None:
        _update_gamma(hs, G, finite, cfg)
    if diag is not None:
        diag.update(sums={k: v.detach().clone() for k, v in sums.items()}, finite=finite,
                    G=None if G is None else G.detach().clone())
    return coefs if partials is not None else None


def rates_foreach(inp: StepInputs, hs: HyperState, tix: TreeIndex, cfg: HyperConfig, step: int,
                  *, host: bool = False) -> Rates:
    """Step 4: ``α* = Σ_j γ_j α_j[node_j]``, ``κ = τ α* + (1 − τ) α_∞``, ``K = −s κ`` per tensor.

    note: α* is formed as α₀ + Σ_j γ_j (α_j − α₀) (equal since Σ γ_j = 1): exactly α₀ while nothing has
    adapted, so hypergrad_lr = gamma_lr = 0 reproduces the base optimizer to the last bit of the rate.
    The parameter level is stored as offsets α − α₀ for the same reason (and for precision).
    """
    levels = cfg.levels
    has_unit, has_param = "unit" in levels, "parameter" in levels
    pos = {lv: i for i, lv in enumerate(levels)}
    gamma = hs.gamma
    tau = tau_at(cfg, step)
    a0 = cfg.lr
    T = len(inp.params)
    block_of, layer_of = tix.present(inp.index)
    dev = (gamma[0] * (hs.coarse["global"][0] - a0)).expand(T)
    if "block" in hs.coarse:
        dev = dev + gamma[pos["block"]] * (hs.coarse["block"][block_of] - a0)
    if "layer" in hs.coarse:
        dev = dev + gamma[pos["layer"]] * (hs.coarse["layer"][layer_of] - a0)
    coarse = dev + a0
    if tau != 1.0:
        coarse = tau * coarse + (1.0 - tau) * cfg.alpha_inf
    base = torch._foreach_mul(list(coarse.unbind()), [-s for s in inp.lr_scales])
    base = [k if k.device == p.device else k.to(p.device) for k, p in zip(base, inp.params)]
    if has_unit:
        for i, p in enumerate(inp.params):
            e = inp.index[i]
            a_u = unit_alpha_view(inp, i)
            b_u = gamma[pos["unit"]] * (-inp.lr_scales[i] * tau)
            base[i] = torch.addcmul(base[i].to(a_u.device), a_u - a0, b_u).reshape(
                unit_view_shape(local(p).shape, tix.unit_dims[e], a_u.shape[0]))
    fine = None
    if has_param:
        g_p = gamma[pos["parameter"]]
        if host:
            g_p = float(g_p)
            fine = [g_p * (-s * tau) for s in inp.lr_scales]
        else:
            fine = [(g_p * (-s * tau)).to(p.device) for s, p in zip(inp.lr_scales, inp.params)]
    return Rates(base, fine)


def unit_alpha_view(inp: StepInputs, i: int) -> Tensor:
    """The unit-level α of the units that tensor ``i`` of the step holds locally (all of them unless sharded)."""
    a = inp.unit_alphas[inp.unit_groups[i]]
    plan = inp.shard
    if plan is None:
        return a
    a = local(a)
    lo, hi = plan.unit_ranges[i]
    if hi == lo:  # an empty shard: no units here
        return a[:0]
    start = plan.alpha_lo[inp.unit_groups[i]]
    if lo - start < 0 or hi - start > a.shape[0]:
        raise RuntimeError(f"CAM-HD: the unit-level α shard [{start}, {start + a.shape[0]}) does not cover this rank's "
                           f"units [{lo}, {hi}) of a tensor; the α vector's placement does not match the parameter's")
    return a[lo - start:hi - start]


def _reduce_partials(inp: StepInputs, plan, tix: TreeIndex, cfg: HyperConfig, S: Tensor, unit_raw: list[Tensor],
                     dirs: list[Tensor], home: torch.device, hd: torch.dtype):
    """Sharded parameters: every partial sum of the step in one small vector, summed across ranks at once.

    Layout: ``[Σh per tensor (T) | unit sums of every touched unit group (full length, zeros outside
    this rank's units) | Σ α_unit·h | Σ offset·h]``. Tensors that are whole on every rank contribute
    after the reduction (to a separate local vector), so nothing is counted once per rank. The two
    ``∂f/∂γ`` partials are formed here, with the α of step t−1, because they need the reduction too.
    Returns the reduced ``S``, unit sums per group and the two γ partials (identical on every rank).
    """
    T = S.shape[0]
    offsets: dict[int, int] = {}
    n = T
    for i in range(len(unit_raw)):
        gi = inp.unit_groups[i]
        if gi not in offsets:
            offsets[gi] = n
            n += tix.unit_count[gi]
    n_g = n
    parts: dict = {}
    for key in plan.distinct_keys:
        v = torch.zeros(n + 2, dtype=hd, device=home)
        v[:T] = torch.where(plan.mask(key, home), S, torch.zeros_like(S))
        parts[key] = v
    want_g = cfg.gamma_lr > 0
    for i, r in enumerate(unit_raw):
        lo, hi = plan.unit_ranges[i]
        v, o = parts[plan.keys[i]], offsets[inp.unit_groups[i]]
        r = (r * inp.dir_scales[i]).to(device=home, dtype=hd)
        v[o + lo:o + hi] += r
        if want_g:
            v[n_g] += (unit_alpha_view(inp, i).to(device=home, dtype=hd) * r).sum()
    if want_g and inp.param_offsets:
        gp = [_vdot(local(a), x) for a, x in zip(inp.param_offsets, dirs)]
        gp = torch._foreach_mul(gp, inp.dir_scales)
        for i, x in enumerate(gp):
            parts[plan.keys[i]][n_g + 1] += x.to(device=home, dtype=hd)
    total = plan.reduce(parts)
    unit_tot = {gi: total[o:o + tix.unit_count[gi]] for gi, o in offsets.items()}
    return total[:T], unit_tot, total[n_g], total[n_g + 1]


def apply_update_foreach(params: list[Tensor], dirs, rates: Rates, param_offsets: list[Tensor] | None) -> None:
    """Step 6: ``θ ← θ + K ⊙ d`` with ``K = −s κ`` (per tensor, per unit or per element).

    The base rule's per-tensor ``scale`` is folded into K (small tensors) rather than into d. With
    decoupled decay this is ``θ ← θ (1 + λK) + K · scale ⊙ q``, rounded as torch's AdamW.
    """
    q = dirs.q if dirs.decay else dirs.d
    c = dirs.scale
    K, fine = rates.base, rates.fine
    Kc = K if c is None else torch._foreach_mul(K, c)
    if fine is not None:
        host = isinstance(fine[0], float)
        fine_c = fine if c is None else ([f * ci for f, ci in zip(fine, c)] if host else torch._foreach_mul(fine, c))
        alphas = [local(a) for a in param_offsets]
        if host and not dirs.decay:  # θ += (a + b δα) · q as two fused ops, nothing model-sized allocated
            torch._foreach_addcmul_(params, q, Kc)
            _foreach_addcmul_mixed(params, alphas, q, fine_c)
            return
        if dirs.decay:
            K = [_plus_scaled(k, a, b) for k, a, b in zip(K, alphas, fine)]
        Kc = [_plus_scaled(k, a, b) for k, a, b in zip(Kc, alphas, fine_c)]
    if dirs.decay:
        _foreach_mul_mixed(params, [k * dirs.decay + 1.0 for k in K])
    torch._foreach_addcmul_(params, q, Kc)


def _plus_scaled(k: Tensor, a: Tensor, b) -> Tensor:
    """``k + b · a`` for a Python or 0-d tensor ``b``."""
    return torch.add(k, a, alpha=b) if isinstance(b, float) else torch.addcmul(k, a, b)


def _vdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a ⊙ b`` as a 0-d tensor; ``linalg.vecdot`` is a multi-threaded fused reduction on CPU
    (``torch.dot`` is single-threaded there)."""
    return torch.linalg.vecdot(a.reshape(-1), b.reshape(-1))


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _foreach_mul_mixed(acc: list[Tensor], other: list[Tensor]) -> None:
    """``acc[i] *= other[i]`` in place (acc may be fp32 while other is bf16, or a broadcast view)."""
    if all(a.dtype == o.dtype and a.shape == o.shape for a, o in zip(acc, other)):
        torch._foreach_mul_(acc, other)
    else:
        for a, o in zip(acc, other):
            a.mul_(o)


def _foreach_addcmul_mixed(acc: list[Tensor], t1: list[Tensor], t2: list[Tensor], values: list[float]) -> None:
    """``acc[i] += values[i] · t1[i] ⊙ t2[i]`` (the lists may differ in dtype)."""
    if all(a.dtype == x.dtype == y.dtype for a, x, y in zip(acc, t1, t2)):
        torch._foreach_addcmul_(acc, t1, t2, values)
    else:
        for a, x, y, v in zip(acc, t1, t2, values):
            a.addcmul_(x, y, value=v)


# ------------------------------------------------------------------------------------------ reference
def hyper_update_reference(inp: StepInputs, hs: HyperState, tree, cfg: HyperConfig,
                           step: int, diag: dict | None = None) -> None:
    """Steps 1–3 written plainly: h per tensor, dense node-sum vectors, α and γ updated in place."""
    levels = cfg.levels
    gamma = hs.gamma
    hd, home = gamma.dtype, gamma.device
    lo, hi = cfg.alpha_min, cfg.alpha_max
    beta, N = cfg.hypergrad_lr, tree.total_numel
    equal = cfg.hypergrad_scaling == "equal"
    pos = {lv: i for i, lv in enumerate(levels)}

    def node_beta(size: int) -> float:
        return beta * N / size if equal else beta

    if cfg.adapts and step > 0:
        # 1. h_p = g_p u_p, and the node sums of every level
        h_list = [local(g).to(hd) * (scale * local(d)) for g, d, scale in zip(inp.grads, inp.dirs, inp.dir_scales)]
        sums: dict[str, Tensor] = {}
        sums["global"] = torch.stack([h.sum() for h in h_list]).sum().reshape(1).to(home)
        if "block" in levels:
            sums["block"] = torch.zeros(len(tree.block_names), dtype=hd, device=home)
            for h, e in zip(h_list, inp.index):
                sums["block"][tree.entry_block[e]] += h.sum().to(home)
        if "layer" in levels:
            sums["layer"] = torch.zeros(len(tree.layer_names), dtype=hd, device=home)
            for h, e in zip(h_list, inp.index):
                sums["layer"][tree.entry_layer[e]] += h.sum().to(home)
        unit_tot: dict[int, Tensor] = {}
        if "unit" in levels:
            for h, e in zip(h_list, inp.index):
                gi = tree.entry_unit_group[e]
                group = tree.unit_groups[gi]
                dim = dict(group.members)[e]
                rows = h.reshape(1) if h.ndim == 0 else h.movedim(dim, 0).reshape(group.count, -1).sum(1)
                unit_tot[gi] = unit_tot.get(gi, torch.zeros(group.count, dtype=hd, device=home)) + rows.to(home)
        finite = torch.stack([torch.isfinite(h).all() for h in h_list]).all()
        # 3 (first half). G_j with the α of step t-1
        if cfg.gamma_lr > 0:
            G = []
            for lv in levels:
                if lv in ("global", "block", "layer"):
                    G.append((hs.coarse[lv] * sums[lv]).sum())
                elif lv == "unit":
                    G.append(sum((inp.unit_alphas[gi] * u).sum() for gi, u in unit_tot.items()))
                else:
                    G.append(sum(((cfg.lr + local(a)) * h).sum() for a, h in zip(inp.param_offsets, h_list)))
            G = torch.stack([torch.as_tensor(x, dtype=hd, device=home).reshape(()) for x in G])
            G = torch.where(torch.isfinite(G), G, torch.zeros_like(G))
        # 2. α_j[n] ← α_j[n] − β_j[n] γ_j Σ_{p∈n} h_p (clamped; skipped when h is non-finite)
        for lv in ("global", "block", "layer"):
            if lv in levels:
                alpha = hs.coarse[lv]
                sizes = tree.node_sizes(lv)
                b = torch.tensor([node_beta(s) for s in sizes], dtype=hd, device=home)
                new = (alpha - b * gamma[pos[lv]] * sums[lv]).clamp(lo, hi)
                alpha.copy_(torch.where(finite, new, alpha))
        if "unit" in levels:
            for gi, u in unit_tot.items():
                alpha = inp.unit_alphas[gi]
                new = (alpha - node_beta(tree.unit_groups[gi].size) * gamma[pos["unit"]] * u).clamp(lo, hi)
                alpha.copy_(torch.where(finite, new, alpha))
        if "parameter" in levels:
            for a, h in zip(inp.param_offsets, h_list):
                a = local(a)  # stored as α − α₀
                new = (a - node_beta(1) * gamma[pos["parameter"]] * h).clamp(*offset_bounds(cfg, a.dtype))
                a.copy_(torch.where(finite, new, a))
        # 3 (second half). γ
        if cfg.gamma_lr > 0:
            _update_gamma(hs, G, finite, cfg)
        if diag is not None:
            diag.update(sums={k: v.detach().clone() for k, v in sums.items()}, finite=finite,
                        G=G.detach().clone() if cfg.gamma_lr > 0 else None)


def rates_reference(inp: StepInputs, hs: HyperState, tree, cfg: HyperConfig, step: int) -> list[Tensor]:
    """Step 4 written plainly: the full ``K = −s κ`` tensor of every parameter."""
    levels = cfg.levels
    hd = hs.gamma.dtype
    pos = {lv: i for i, lv in enumerate(levels)}
    # 4. α*_p = α₀ + Σ_j γ_j (α_j[node_j(p)] − α₀) (= Σ_j γ_j α_j as Σ γ = 1) per parameter; κ; K = −s κ
    gamma = hs.gamma
    tau = tau_at(cfg, step)
    a0 = cfg.lr
    out = []
    for i, (p, e) in enumerate(zip(inp.params, inp.index)):
        shape = local(p).shape
        dev = torch.zeros(shape, dtype=hd, device=p.device)
        for lv in levels:
            g_j = gamma[pos[lv]].to(p.device)
            if lv == "global":
                alpha = hs.coarse["global"][0].to(p.device)
            elif lv == "block":
                alpha = hs.coarse["block"][tree.entry_block[e]].to(p.device)
            elif lv == "layer":
                alpha = hs.coarse["layer"][tree.entry_layer[e]].to(p.device)
            elif lv == "unit":
                gi = tree.entry_unit_group[e]
                group = tree.unit_groups[gi]
                dim = dict(group.members)[e]
                alpha = inp.unit_alphas[gi].to(p.device).reshape(unit_view_shape(shape, dim, group.count))
            else:
                alpha = a0 + local(inp.param_offsets[i])
            dev += g_j * (alpha - a0)
        a_star = dev + a0
        kappa = tau * a_star + (1.0 - tau) * cfg.alpha_inf
        out.append(-inp.lr_scales[i] * kappa)
    return out


def apply_update_reference(params: list[Tensor], dirs, K: list[Tensor]) -> None:
    """Step 6, one tensor at a time: ``θ ← θ + K ⊙ d`` (decoupled decay applied multiplicatively)."""
    for i, (p, k) in enumerate(zip(params, K)):
        if dirs.decay:
            p.mul_(1.0 + dirs.decay * k)
            p.add_((k * dirs.q[i]).to(p.dtype))
        else:
            p.add_((k * dirs.d[i]).to(p.dtype))
