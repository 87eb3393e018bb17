"""CAM-HD optimizers: ``CAMHDSGD``, ``CAMHDAdam``, ``CAMHDAdamW`` (spec §1–§4).

CAM-HD (combined adaptive multi-level hyper-gradient descent) learns the learning rate by
hyper-gradient descent at several levels of a network at once and mixes them with learned weights::

    h_p       = g_{t,p} · u_{t-1,p}                       (u: ∂θ_{t-1}/∂α*, the last update's derivative)
    α_j[n]   ← α_j[n] − β_j[n] · γ_j · Σ_{p∈n} h_p        (every level j, node n; β_j[n] = β·N/N_n)
    γ_j      ← γ_j − δ · Σ_n α_j[n] Σ_{p∈n} h_p,  then clamp at 0 and renormalise (or softmax logits)
    α*_p      = Σ_j γ_j · α_j[node_j(p)]
    κ_t       = τ(t) α* + (1 − τ(t)) α_∞,   τ(t) = exp(−r t)
    θ_t       = θ_{t-1} − s_t κ_t ⊙ d_t,    u_t = −s_t τ(t) d_t

with ``d_t`` the base optimizer's direction (:mod:`hf_camhd.optim.base_rules`) and
``s_t = group["lr"] / lr`` the scheduler's multiplier. Symbols ↔ arguments: α₀ = ``lr``,
β = ``hypergrad_lr``, δ = ``gamma_lr``, r = ``decay_rate``, α_∞ = ``alpha_inf``, γ₀ = ``gamma``.

Reference: "Adaptive Multi-level Hyper-gradient Descent" (ICLR 2021 submission); Baydin et al.,
"Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018 (the global-only tree).

Where the state lives (and why):

* ``param_groups[0]`` holds the model-wide hyper-state: ``camhd_gamma`` (and ``camhd_gamma_logits``),
  ``camhd_alpha_global`` / ``camhd_alpha_block`` / ``camhd_alpha_layer`` (fp32 vectors),
  ``camhd_step``, ``camhd_lr`` (α₀) and ``camhd_tree`` (the tree as plain data). Group entries survive
  ``accelerate``'s ``prepare()``, FSDP2's ``get_optimizer_state_dict`` and are never cast to a bf16
  parameter dtype.
* per-parameter state holds the base rule's buffers, ``hypergrad_dir`` and the 0-d
  ``hypergrad_dir_scale`` (the last update's derivative is ``u = hypergrad_dir_scale · hypergrad_dir``,
  both fp32), ``camhd_alpha_parameter_offset`` (the parameter level's α − ``lr``, so that an unadapted
  rate is exactly ``lr``) and, on the tensor that owns a layer's units, ``camhd_alpha_unit``. A load
  hook keeps these fp32 on bf16 parameters.
* ``group["lr"]`` is only ever the scheduler's value: learned rates never go there.
* sharded parameters (FSDP2 ``DTensor`` s): the step works on each rank's shards, the node sums are local
  partial sums reduced with one ``all_reduce`` per step, and per-parameter state is sharded like the
  parameter (:mod:`hf_camhd.optim.distributed`). ``torch.distributed.checkpoint``'s state-creating
  ``step()`` (zero gradients, ``lr=0``) only creates the state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..hierarchy import LRTree, build_hierarchy, tree_from_named_parameters, tree_from_plain_params
from ..hierarchy.tree import validate_levels
from . import _fused
from . import _kernels as K
from . import distributed as D
from .base_rules import AdamRule, BaseRule, SGDRule
from .validation import (
    GAMMA_UPDATES,
    HYPERGRAD_SCALINGS,
    check_alpha_bounds,
    check_betas,
    check_choice,
    check_eps,
    check_gamma,
    check_lr,
    check_momentum,
    check_nonnegative,
)

HYPER_PARAM_KEYS = ("hypergrad_dir", "hypergrad_dir_scale", "camhd_alpha_unit", "camhd_alpha_parameter_offset")
"""Per-parameter state entries kept in fp32 (float64 for float64 params) whatever the param dtype."""

_G = "camhd_"  # prefix of the model-wide entries of param_groups[0]
COARSE_LEVELS = ("global", "block", "layer")


def _hyper_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class CAMHDOptimizer(Optimizer):
    """Shared CAM-HD step-size layer over a :class:`~hf_camhd.optim.base_rules.BaseRule`.

    Use :class:`CAMHDSGD`, :class:`CAMHDAdam` or :class:`CAMHDAdamW`; a new base optimizer is a
    subclass that sets ``rule`` and validates its own arguments.
    """

    rule: BaseRule

    def __init__(self, params: Any, defaults: dict, *, levels, gamma, hypergrad_lr, gamma_lr, decay_rate,
                 alpha_inf, hypergrad_scaling, gamma_update, alpha_min, alpha_max, maximize, tree, foreach,
                 fused=None):
        lr = check_lr(defaults["lr"])
        hypergrad_lr = check_nonnegative("hypergrad_lr", hypergrad_lr)
        gamma_lr = check_nonnegative("gamma_lr", gamma_lr)
        decay_rate = check_nonnegative("decay_rate", decay_rate)
        check_choice("hypergrad_scaling", hypergrad_scaling, HYPERGRAD_SCALINGS)
        check_choice("gamma_update", gamma_update, GAMMA_UPDATES)
        alpha_min, alpha_max = check_alpha_bounds(alpha_min, alpha_max, lr)
        alpha_inf = lr if alpha_inf is None else check_nonnegative("alpha_inf", alpha_inf)
        groups, tree = _resolve_params(params, levels, tree)
        for name, flag in (("foreach", foreach), ("fused", fused)):
            if flag is not None and not isinstance(flag, bool):
                raise ValueError(f"Invalid {name}: {flag!r}; expected True, False or None")
        if foreach and fused:
            raise ValueError("foreach=True and fused=True cannot both be set; pick one (the default, both None, "
                             "uses the fused CPU kernels where they apply and foreach elsewhere)")
        gamma0 = check_gamma(gamma, tree.levels, gamma_update)
        defaults = dict(defaults, maximize=bool(maximize))
        super().__init__(groups, defaults)
        self.tree: LRTree = tree
        self.config = K.HyperConfig(tree.levels, lr, hypergrad_lr, gamma_lr, decay_rate, float(alpha_inf),
                                    hypergrad_scaling, gamma_update, alpha_min, alpha_max)
        self.foreach = True if foreach is None else foreach
        # fused: True = required (a step that cannot be fused raises, naming why), None = wherever it applies
        # (the default when neither is chosen), False = never; an explicit foreach=True / False is honoured
        self.fused: bool | None = fused if fused is not None else (None if foreach is None else False)
        self._tree_index: dict = {}
        self._zeroed_dirs: set[int] = set()
        self._last_hyper: dict = {}
        self._last_path: str | None = None  # "fused" / "foreach" / "reference": the kernels of the last step
        self._stash: dict = {}
        self._layouts: dict = {}
        self._init_group_state(gamma0)
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)

    # ------------------------------------------------------------------------------------ state
    def _flat_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _home(self) -> tuple[torch.device, torch.dtype]:
        params = self._flat_params()
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        return params[0].device, dtype

    def _init_group_state(self, gamma0: list[float]) -> None:
        device, dtype = self._home()
        g0 = self.param_groups[0]
        lr = self.config.lr
        g0[_G + "step"] = 0
        g0[_G + "lr"] = lr
        g0[_G + "gamma"] = torch.tensor(gamma0, dtype=dtype, device=device)
        if self.config.gamma_update == "softmax":
            g0[_G + "gamma_logits"] = torch.log(g0[_G + "gamma"])
        for lv in COARSE_LEVELS:
            if lv in self.tree.levels:
                g0[_G + "alpha_" + lv] = torch.full((self.tree.num_nodes(lv),), lr, dtype=dtype, device=device)
        g0[_G + "tree"] = self.tree.to_dict()

    def _hyper_state(self) -> K.HyperState:
        g0 = self.param_groups[0]
        coarse = {lv: g0[_G + "alpha_" + lv] for lv in COARSE_LEVELS if _G + "alpha_" + lv in g0}
        return K.HyperState(g0[_G + "gamma"], coarse, g0.get(_G + "gamma_logits"))

    def _index(self, device: torch.device, dtype: torch.dtype) -> K.TreeIndex:
        key = (device, dtype)
        if key not in self._tree_index:
            self._tree_index[key] = K.build_tree_index(self.tree, self.config, device, dtype)
        return self._tree_index[key]

    def _init_param_state(self, i: int, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        self.rule.init_state(p, state, group)
        hd = _hyper_dtype(p.dtype)
        if "hypergrad_dir" not in state:
            state["hypergrad_dir"] = torch.zeros_like(p, dtype=hd, memory_format=torch.preserve_format)
            state["hypergrad_dir_scale"] = torch.zeros((), dtype=hd, device=p.device)
        if "parameter" in self.tree.levels and "camhd_alpha_parameter_offset" not in state:
            state["camhd_alpha_parameter_offset"] = torch.zeros_like(p, dtype=hd)
        return state

    def _host_scalars(self) -> bool:
        """Whether the hyper-state is on the CPU, where reading a scalar costs nothing (see
        :func:`hf_camhd.optim._kernels.hyper_update_foreach`). ``_force_device_path`` is for tests."""
        return self.param_groups[0][_G + "gamma"].device.type == "cpu" and not getattr(self, "_force_device_path", False)

    def _unit_alpha(self, gi: int, flat: list[Tensor]) -> Tensor:
        group = self.tree.unit_groups[gi]
        owner = flat[group.owner]
        state = self.state[owner]
        if "camhd_alpha_unit" not in state:
            hd = _hyper_dtype(owner.dtype)
            if D.is_dtensor(owner):  # sharded like the layer's tensors (see hf_camhd.optim.distributed)
                layouts = [(self._layout(m, flat[m]), dim) for m, dim in group.members]
                state["camhd_alpha_unit"] = D.full_unit_alpha(owner, layouts, group.count, self.config.lr, hd)
            else:
                state["camhd_alpha_unit"] = torch.full((group.count,), self.config.lr, dtype=hd, device=owner.device)
        return state["camhd_alpha_unit"]

    def _layout(self, i: int, p: Tensor) -> D.TensorLayout:
        """How tensor ``i`` is split across ranks (cached; recomputed when its mesh or placements change)."""
        key = (p.device_mesh, tuple(p.placements), tuple(p.shape)) if D.is_dtensor(p) else (None, None, tuple(p.shape))
        hit = self._layouts.get(i)
        if hit is None or hit[0] != key:
            e = self.tree.entries[i]
            hit = self._layouts[i] = (key, D.tensor_layout(p, e.unit_dim if p.ndim else 0, e.name))
        return hit[1]

    def _shard_plan(self, inp: K.StepInputs, flat: list[Tensor]) -> D.ShardPlan:
        layouts = [self._layout(i, flat[i]) for i in inp.index]
        plan = D.ShardPlan([lay.key for lay in layouts], [(lay.unit_lo, lay.unit_hi) for lay in layouts],
                           {lay.key: lay.group for lay in layouts if lay.key is not None})
        for gi, a in inp.unit_alphas.items():
            plan.alpha_lo[gi] = D.local_range(a)[0]
        return plan

    def _is_state_init_step(self) -> bool:
        """``torch.distributed.checkpoint.state_dict`` creates missing state by calling ``step()`` once with
        zero gradients and every group's ``lr`` set to 0 (``_init_optim_state``). That call must change
        nothing — no step counted, no moments, no hyper-update — so it only creates the state."""
        if self.state or any(float(g["lr"]) != 0.0 for g in self.param_groups):
            return False
        flat = self._flat_params()
        with_grad = [(i, p) for i, p in enumerate(flat) if p.grad is not None]
        if not with_grad:
            return False
        nonzero = torch.tensor([float(any(bool(K.local(p.grad).any()) for _, p in with_grad))])
        # sharded: a rank may hold only zeros of a real gradient; every rank must decide alike
        groups = {}
        for i, p in with_grad:
            if D.is_dtensor(p):
                lay = self._layout(i, p)
                if lay.key is not None:
                    groups.setdefault(lay.key, lay.group)
        if groups:
            import torch.distributed as dist
            dev = K.local(with_grad[0][1]).device
            nonzero = nonzero.to(dev)
            for group in groups.values():
                dist.all_reduce(nonzero, op=dist.ReduceOp.MAX, group=group)
        return not bool(nonzero.item())

    def _create_state(self) -> None:
        """Create every per-parameter state entry a real step would (zeros / α₀), changing nothing else."""
        flat = self._flat_params()
        for i, (group, p) in enumerate((g, p) for g in self.param_groups for p in g["params"]):
            if p.grad is None:
                continue
            state = self._init_param_state(i, p, group)
            if isinstance(self.rule, SGDRule) and group["momentum"] != 0 and "momentum_buffer" not in state:
                # note: torch.optim.SGD creates its buffer in this call too (zeros, as the grads are zero)
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "unit" in self.tree.levels:
            for gi, group in enumerate(self.tree.unit_groups):
                if flat[group.owner].grad is not None:
                    self._unit_alpha(gi, flat)

    # ------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one CAM-HD step (spec §4). ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        g0 = self.param_groups[0]
        cfg = self.config
        flat = self._flat_params()
        D.check_not_flattened(self, flat)
        if self._is_state_init_step():
            self._create_state()
            return loss
        sharded = any(D.is_dtensor(p) for p in flat)
        if sharded and not self.foreach:
            raise NotImplementedError(f"{type(self).__name__}(foreach=False) does not support sharded "
                                      "(FSDP2 / DTensor) parameters; use the default foreach=True")
        step = int(g0[_G + "step"])
        tau = K.tau_at(cfg, step)
        inp = K.StepInputs([], [], [], [], [], [])
        per_group: list[tuple[dict, list[int]]] = []
        dparams: list[Tensor] = []        # the parameters as stored (DTensors when sharded)
        states: list[dict] = []           # the state dicts the base rule works on (local views when sharded)
        has_unit, has_param = "unit" in cfg.levels, "parameter" in cfg.levels
        pos = 0
        for group in self.param_groups:
            members = []
            s = group["lr"] / g0[_G + "lr"]
            for p in group["params"]:
                i, pos = pos, pos + 1
                if p.grad is None:
                    if i not in self._zeroed_dirs and p in self.state and "hypergrad_dir" in self.state[p]:
                        # note: a tensor that did not move has u = 0 at the next step
                        self.state[p]["hypergrad_dir"].zero_()
                        self._zeroed_dirs.add(i)
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter "
                                       f"{self.tree.entries[i].name!r}); use dense gradients, e.g. "
                                       "nn.Embedding(..., sparse=False)")
                self._zeroed_dirs.discard(i)
                state = self._init_param_state(i, p, group)
                grad = p.grad if not group["maximize"] else -p.grad
                if sharded:  # note: the kernels and the base rule work on this rank's shards (views into the DTensors)
                    state = {k: K.local(v) if D.is_dtensor(v) else v for k, v in state.items()}
                    grad = K.local(grad)
                dparams.append(p)
                states.append(state)
                inp.index.append(i)
                inp.params.append(K.local(p) if sharded else p)
                inp.grads.append(grad)
                inp.dirs.append(state["hypergrad_dir"])
                inp.dir_scales.append(state["hypergrad_dir_scale"])
                inp.lr_scales.append(s)
                if has_unit:
                    gi = self.tree.entry_unit_group[i]
                    inp.unit_groups.append(gi)
                    if gi not in inp.unit_alphas:
                        inp.unit_alphas[gi] = self._unit_alpha(gi, flat)
                if has_param:
                    inp.param_offsets.append(state["camhd_alpha_parameter_offset"])
                members.append(len(inp.params) - 1)
            per_group.append((group, members))
        if not inp.params:
            return loss
        if sharded:
            inp.shard = self._shard_plan(inp, flat)

        hs = self._hyper_state()
        diag: dict = {}
        self._last_hyper = diag
        why_not = self._fused_ineligible(inp, states)
        if self.fused and why_not:
            raise RuntimeError(f"{type(self).__name__}(fused=True) cannot fuse this step: {why_not}. Use fused=None "
                               "(the default: fused where it applies, foreach elsewhere) or foreach=True.")
        self._last_path = "fused" if why_not is None else ("foreach" if self.foreach else "reference")
        if why_not is None:
            self._fused_step(inp, hs, states, per_group, step, tau, diag)
            g0[_G + "step"] = step + 1
            return loss
        if self.foreach:
            tix = self._index(*self._home())
            host = self._host_scalars()
            K.hyper_update_foreach(inp, hs, tix, cfg, step, diag, host=host)   # steps 1–3
            rates = K.rates_foreach(inp, hs, tix, cfg, step, host=host)       # step 4
        else:
            K.hyper_update_reference(inp, hs, self.tree, cfg, step, diag)
            rates = K.rates_reference(inp, hs, self.tree, cfg, step)

        for group, members in per_group:  # steps 5–6, per param group (each has its own base settings)
            if not members:
                continue
            params = [inp.params[m] for m in members]
            old_dirs = [inp.dirs[m] for m in members]
            views = [states[m] for m in members]
            before = [dict(v) for v in views] if sharded else None
            dirs = self.rule.directions(params, [inp.grads[m] for m in members], views,
                                        group, foreach=self.foreach, out=old_dirs)
            if sharded:  # entries the base rule created on the local views become DTensors placed like the param
                for m, pv, view, old in zip(members, params, views, before):
                    real = self.state[dparams[m]]
                    for k, v in view.items():
                        if old.get(k) is not v:
                            shaped = isinstance(v, Tensor) and v.shape == pv.shape
                            real[k] = D.wrap_like(dparams[m], v) if shaped else v
            if self.foreach:
                sub = K.Rates([rates.base[m] for m in members],
                              None if rates.fine is None else [rates.fine[m] for m in members])
                K.apply_update_foreach(params, dirs, sub, [inp.param_offsets[m] for m in members]
                                       if inp.param_offsets else None)
            else:
                K.apply_update_reference(params, dirs, [rates[m] for m in members])
            for m, d, owned, old in zip(members, dirs.d, dirs.owned, old_dirs):
                if d is old:
                    continue
                if owned and d.dtype == old.dtype:
                    self.state[dparams[m]]["hypergrad_dir"] = D.wrap_like(dparams[m], d) if sharded else d
                else:
                    old.copy_(d)
            _store_dir_scales([inp.dir_scales[m] for m in members], group["lr"] / g0[_G + "lr"], tau, dirs.scale)
        g0[_G + "step"] = step + 1
        return loss

    def _fused_ineligible(self, inp: K.StepInputs, states: list[dict]) -> str | None:
        """Why this step cannot take the fused CPU path (:mod:`hf_camhd.optim._fused`), or ``None``."""
        if self.fused is False:
            return "fused=False" if self.foreach is None else f"foreach={self.foreach} was chosen"
        if self.rule.fused_state_keys is None:
            return f"the {self.rule.name} rule has no fused kernel"
        if inp.shard is not None:
            return "the parameters are sharded (DTensor)"
        if "unit" in self.config.levels:
            tix = self._index(*self._home())
            for e in inp.index:
                if tix.unit_dims[e] != 0:
                    return (f"{self.tree.entries[e].name!r} has its units along dim {tix.unit_dims[e]} (the fused "
                            "kernels take units along dim 0)")
        if not self._host_scalars():
            return "the hyper-state is not on the CPU"
        if _fused.load() is None:
            if self.fused is None:
                _fused.warn_unavailable_once()
            return f"the fused kernels are unavailable ({_fused.unavailable_reason()})"
        for i, p in enumerate(inp.params):
            state = states[i]
            why = _fused.ineligible_reason([
                ("the parameter", p), ("its gradient", inp.grads[i]), ("hypergrad_dir", inp.dirs[i]),
                ("camhd_alpha_parameter_offset", inp.param_offsets[i] if inp.param_offsets else None),
                *((k, state.get(k)) for k in self.rule.fused_state_keys)])
            if why:
                return f"{self.tree.entries[inp.index[i]].name!r}: {why}"
        return None

    def _fused_step(self, inp: K.StepInputs, hs: K.HyperState, states: list[dict], per_group: list, step: int,
                    tau: float, diag: dict) -> None:
        """Steps 1–6 with the fused kernels: pass 1 (partial sums) → α / γ on those numbers → pass 2 per group."""
        cfg = self.config
        partials = None
        tix = self._index(*self._home())
        has_unit = "unit" in cfg.levels
        if cfg.adapts and step > 0:
            want_off = "parameter" in cfg.levels and cfg.gamma_lr > 0
            counts = [tix.unit_count[gi] for gi in inp.unit_groups] if has_unit else None
            partials = _fused.partial_sums(inp.grads, inp.dirs, inp.param_offsets if want_off else None, counts)
        coefs = K.hyper_update_foreach(inp, hs, tix, cfg, step, diag, host=True, partials=partials)  # steps 1–3
        rates = K.rates_foreach(inp, hs, tix, cfg, step, host=True)                                 # step 4
        T = len(inp.params)
        if has_unit:  # K per unit (along dim 0): the kernels scale these factors
            k_rows = [b.reshape(-1).to(torch.float64) for b in rates.base]
            k_base = [1.0] * T
        else:
            k_rows, k_base = [None] * T, torch.stack(rates.base).tolist()
        k_fine = rates.fine if rates.fine is not None else [0.0] * T
        offsets = inp.param_offsets or [None] * T
        if coefs is None:
            alpha = [(0, 0.0, 0.0, 0.0)] * T
        else:  # step 2 at the parameter level, applied element-wise inside pass 2
            alpha = [(1, c, *K.offset_bounds(cfg, o.dtype)) for c, o in zip(coefs, offsets)]
        lr0 = self.param_groups[0][_G + "lr"]
        for group, members in per_group:  # steps 5–6
            if not members:
                continue
            pick = lambda xs: [xs[m] for m in members]  # noqa: E731
            scale = self.rule.fused_update(pick(inp.params), pick(inp.grads), pick(states), group, pick(inp.dirs),
                                           pick(offsets), pick(k_rows), pick(k_base), pick(k_fine), pick(alpha))
            _store_dir_scales(pick(inp.dir_scales), group["lr"] / lr0, tau, scale)

    # ------------------------------------------------------------------------------------ reading
    @property
    def levels(self) -> tuple[str, ...]:
        """The tree's levels, coarse to fine (``global`` first)."""
        return self.tree.levels

    @property
    def gamma(self) -> Tensor:
        """The combination weights γ (one per level, ≥ 0, summing to 1) as a 1-D fp32 tensor."""
        return self.param_groups[0][_G + "gamma"].detach().to(torch.float32, copy=True)

    @property
    def num_steps(self) -> int:
        """Number of CAM-HD steps taken (the t of τ(t))."""
        return int(self.param_groups[0][_G + "step"])

    def alpha(self, level: str, *, dtype: torch.dtype | None = torch.float32) -> Tensor:
        """Every node's learned rate α at ``level`` as a 1-D tensor (fp32 by default).

        For ``unit`` and ``parameter`` the nodes are concatenated in parameter order; nodes whose
        tensors never received a gradient still hold ``lr``.
        """
        self.tree._check_level(level)
        g0 = self.param_groups[0]
        if level in COARSE_LEVELS:
            out = g0[_G + "alpha_" + level].detach().clone()
        else:
            flat = self._flat_params()
            device = g0[_G + "gamma"].device
            parts = []
            if level == "unit":
                for group in self.tree.unit_groups:
                    a = self.state.get(flat[group.owner], {}).get("camhd_alpha_unit")
                    parts.append(_full_local(a, (group.count,), self.config.lr, device))
            else:
                for p in flat:
                    a = self.state.get(p, {}).get("camhd_alpha_parameter_offset")
                    if a is None:
                        parts.append(torch.full((p.numel(),), self.config.lr, dtype=torch.float64, device=device))
                    else:  # α₀ + offset evaluated in the offset's dtype (as the step does)
                        full = getattr(a, "full_tensor", None)
                        a = full() if full is not None else a
                        parts.append((a.detach() + self.config.lr).reshape(-1).to(device=device, dtype=torch.float64))
            out = torch.cat(parts)
        return out if dtype is None else out.to(dtype)

    def lr_stats(self) -> dict[str, float]:
        """Scalars for logging: γ per level, mean/min/max α per level and the mean effective rate
        ``s · κ`` over all trainable scalars (weighted by node size). Reads the device once."""
        cfg, tree = self.config, self.tree
        out: dict[str, Tensor] = {}
        gamma = self.param_groups[0][_G + "gamma"]
        param_stats = None
        for j, lv in enumerate(cfg.levels):
            out[f"camhd/gamma_{lv}"] = gamma[j]
            if lv == "parameter":  # streamed per tensor: no model-sized concatenation
                param_stats = self._parameter_level_stats()
                mean, lo, hi = param_stats
            else:
                a = self.alpha(lv, dtype=None)
                mean, lo, hi = a.mean(), a.min(), a.max()
            out[f"camhd/alpha_{lv}_mean"] = mean
            out[f"camhd/alpha_{lv}_min"] = lo
            out[f"camhd/alpha_{lv}_max"] = hi
        # mean of α* over scalars = Σ_j γ_j · (size-weighted mean of α_j)
        mean_star = 0.0
        for j, lv in enumerate(cfg.levels):
            if lv == "parameter":
                weighted = param_stats[0].to(gamma.device, gamma.dtype)
            else:
                a = self.alpha(lv, dtype=None).to(gamma.device, gamma.dtype)
                sizes = torch.tensor(tree.node_sizes(lv), dtype=a.dtype, device=a.device)
                weighted = (a * sizes).sum() / tree.total_numel
            mean_star = mean_star + gamma[j] * weighted
        tau = K.tau_at(cfg, self.num_steps)
        s = self.param_groups[0]["lr"] / self.param_groups[0][_G + "lr"]
        out["camhd/alpha_star_mean"] = mean_star
        out["camhd/effective_lr_mean"] = s * (tau * mean_star + (1 - tau) * cfg.alpha_inf)
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for v in out.values()])
        return dict(zip(out.keys(), values.tolist()))

    def _parameter_level_stats(self) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, min and max of the parameter level's α over every scalar, one tensor at a time (α₀ + offset
        evaluated in the offset's dtype, as the step does); sharded tensors are summed across ranks."""
        lr = self.config.lr
        flat = self._flat_params()
        device = self.param_groups[0][_G + "gamma"].device
        acc: dict = {}     # reduction key -> [Σα, min α, max α]; keys in parameter order (the same on every rank)
        groups: dict = {}
        inf = float("inf")
        for i, p in enumerate(flat):
            lay = self._layout(i, p) if D.is_dtensor(p) else None
            key = lay.key if lay is not None else None
            if key is not None:
                groups[key] = lay.group
            a = self.state.get(p, {}).get("camhd_alpha_parameter_offset")
            if a is None:
                n = K.local(p).numel()
                part = [lr * n, lr, lr] if n else [0.0, inf, -inf]
            else:
                v = K.local(a).detach()
                part = [0.0, inf, -inf]
                if v.numel():
                    v = (v + lr).to(torch.float64)
                    part = [v.sum(), v.min(), v.max()]
            part = torch.stack([torch.as_tensor(x, dtype=torch.float64, device=device).reshape(()) for x in part])
            prev = acc.get(key)
            acc[key] = part if prev is None else torch.stack(
                [prev[0] + part[0], torch.minimum(prev[1], part[1]), torch.maximum(prev[2], part[2])])
        total = None
        for key, v in acc.items():
            if key is not None:  # one SUM and one MAX (of max and −min) per process group
                import torch.distributed as dist
                sums, ext = v[:1].clone(), torch.stack([v[2], -v[1]])
                dist.all_reduce(sums, group=groups[key])
                dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=groups[key])
                v = torch.stack([sums[0], -ext[1], ext[0]])
            total = v if total is None else torch.stack(
                [total[0] + v[0], torch.minimum(total[1], v[1]), torch.maximum(total[2], v[2])])
        return total[0] / self.tree.total_numel, total[1], total[2]

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (levels: {', '.join(self.levels)}; "
                 f"{len(self.tree.entries)} tensors, {self.tree.total_numel:,} parameters)"]
        cfg = self.config
        lines.append(f"  hypergrad_lr: {cfg.hypergrad_lr}, gamma_lr: {cfg.gamma_lr}, decay_rate: {cfg.decay_rate}, "
                     f"alpha_inf: {cfg.alpha_inf}, hypergrad_scaling: {cfg.hypergrad_scaling}, "
                     f"gamma_update: {cfg.gamma_update}")
        lines.append(f"  gamma: {[round(x, 4) for x in self.gamma.tolist()]}")
        for i, group in enumerate(self.param_groups):
            keys = [k for k in sorted(group) if k not in ("params", "param_names") and not k.startswith(_G)]
            lines.append(f"  group {i}: " + ", ".join(f"{k}={group[k]}" for k in keys))
        return "\n".join(lines)


def _store_dir_scales(scales: list[Tensor], s: float, tau: float, dir_scale: list[float] | None) -> None:
    """``u_t = −s_t τ_t · scale · d_t``: the 0-d factors of the stored directions (written without a host round trip)."""
    u_scale = -s * tau
    torch._foreach_zero_(scales)
    torch._foreach_add_(scales, [u_scale] * len(scales) if dir_scale is None else [u_scale * c for c in dir_scale])


def _full_local(a: Tensor | None, shape: tuple, value: float, device) -> Tensor:
    if a is None:
        return torch.full(shape, value, dtype=torch.float64, device=device)
    full = getattr(a, "full_tensor", None)
    a = full() if full is not None else a
    return a.detach().to(device=device, dtype=torch.float64)


# ---------------------------------------------------------------------------------- param resolution
def _resolve_params(params: Any, levels, tree: LRTree | None) -> tuple[list[dict], LRTree]:
    """Turn the first argument (+ optional ``tree=``) into param groups and a matching tree.

    Accepted: an ``nn.Module``; an ``LRTree`` built from a live module; ``model.named_parameters()``;
    plain tensors; param-group dicts whose ``params`` are tensors or ``(name, tensor)`` pairs.
    Frozen tensors are left out. The returned tree follows the groups' parameter order.
    """
    if levels is not None:
        levels = validate_levels(levels)
    if isinstance(params, LRTree):
        if params.module is None:
            raise ValueError("Invalid params: this LRTree is not bound to a live model (it was loaded from JSON "
                             "or its model was deleted); pass the model with tree=..., e.g. CAMHDAdam(model, tree=tree)")
        tree = params if tree is None else tree
        params = params.module
    if isinstance(params, nn.Module):
        model = params
        if tree is None:
            tree = build_hierarchy(model, levels if levels is not None else ("global", "layer"))
        named = dict(model.named_parameters())
        groups = [{"params": [named[n] for n in tree.param_names], "param_names": tree.param_names}]
        _check_tree_levels(tree, levels)
        return groups, tree
    if isinstance(params, torch.Tensor):
        raise TypeError("params argument given to the optimizer should be an iterable of Tensors or dicts, "
                        f"but got {torch.typename(params)}")
    items = list(params)
    if not items:
        raise ValueError("Invalid params: empty parameter list")
    if isinstance(items[0], Mapping):
        raw_groups = [dict(g) for g in items]
    else:
        raw_groups = [{"params": items}]
    groups, names, shapes_named = [], [], []
    any_named = any_plain = False
    for gi, g in enumerate(raw_groups):
        ps = g.get("params")
        if ps is None:
            raise ValueError(f"Invalid params: param group {gi} has no 'params' entry")
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        kept, kept_names = [], []
        given_names = g.pop("param_names", None)
        for k, item in enumerate(ps):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, p = item
                any_named = True
            else:
                p = item
                name = given_names[k] if given_names is not None else None
                any_named |= name is not None
                any_plain |= name is None
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {torch.typename(p)}")
            if not p.requires_grad:
                continue  # frozen tensors are left out (spec §1)
            kept.append(p)
            kept_names.append(name if name is not None else f"param{len(names) + len(kept_names)}")
        if kept:
            g["params"] = kept
            g["param_names"] = kept_names
            groups.append(g)
            names.extend(kept_names)
            shapes_named.extend(zip(kept_names, kept))
    if not groups:
        raise ValueError("Invalid params: empty parameter list (every parameter is frozen)")
    if any_named and any_plain and tree is None:
        raise ValueError("Invalid params: mix of named and unnamed parameters; name all of them or none")
    flat = [p for g in groups for p in g["params"]]
    if tree is not None:
        tree = tree.reordered(names) if tree.param_names != names else tree
        for e, p in zip(tree.entries, flat):
            if tuple(p.shape) != e.shape:
                raise ValueError(f"Invalid tree: parameter {e.name!r} has shape {tuple(p.shape)} but the tree says {e.shape}")
        _check_tree_levels(tree, levels)
    elif any_named:
        tree = tree_from_named_parameters(shapes_named, levels if levels is not None else ("global", "layer"))
    else:
        tree = tree_from_plain_params(flat, levels if levels is not None else ("global", "layer"), names)
    if not any_named:
        for g in groups:
            del g["param_names"]  # plain tensors: keep torch's unnamed-group layout
    return groups, tree


def _check_tree_levels(tree: LRTree, levels) -> None:
    if levels is not None and tuple(levels) != tree.levels:
        raise ValueError(f"Invalid levels {tuple(levels)!r}: the tree given has levels {tree.levels!r}; "
                         "pass levels=None or a tree built with the same levels")


# ---------------------------------------------------------------------------------- checkpoint hooks
def _load_pre_hook(opt: CAMHDOptimizer, state_dict: dict) -> dict:
    """Check the saved tree matches, and keep the fp32 hyper-state out of torch's dtype casting."""
    groups = state_dict.get("param_groups") or [{}]
    saved_tree = groups[0].get(_G + "tree")
    if saved_tree is None:
        raise ValueError(f"{type(opt).__name__}.load_state_dict: the state dict has no CAM-HD tree "
                         f"(param_groups[0]['{_G}tree']); it was not saved by a CAM-HD optimizer")
    diff = opt.tree.first_difference(saved_tree)
    if diff is not None:
        raise ValueError(f"{type(opt).__name__}.load_state_dict: the saved learning-rate tree does not match this "
                         f"model's: {diff}. Build the optimizer over the same model and levels as the checkpoint.")
    saved_ids = [pid for g in groups for pid in g["params"]]
    position = {pid: i for i, pid in enumerate(saved_ids)}
    new_state, stash = {}, {}
    for pid, entry in state_dict.get("state", {}).items():
        entry = dict(entry)
        kept = {k: entry.pop(k) for k in HYPER_PARAM_KEYS if k in entry}
        if kept and pid in position:
            stash[position[pid]] = kept
        new_state[pid] = entry
    opt._stash = stash
    state_dict = dict(state_dict)
    state_dict["state"] = new_state
    return state_dict


def _load_post_hook(opt: CAMHDOptimizer) -> None:
    """Restore the stashed hyper-state on each param's device in fp32, and move the group-0 tensors
    (which ``load_state_dict`` leaves wherever they were loaded) to the parameters' device."""
    flat = opt._flat_params()
    for i, kept in opt._stash.items():
        p = flat[i]
        state = opt.state[p]
        for k, v in kept.items():
            state[k] = v.to(device=p.device, dtype=_hyper_dtype(p.dtype))
    opt._stash = {}
    device, dtype = opt._home()
    g0 = opt.param_groups[0]
    for k, v in list(g0.items()):
        if k.startswith(_G) and isinstance(v, torch.Tensor):
            g0[k] = v.to(device=device, dtype=dtype)
    g0[_G + "step"] = int(g0[_G + "step"])
    opt._zeroed_dirs = set()


# ---------------------------------------------------------------------------------- public classes
_CAMHD_DOC = """
    Args:
        params: an ``nn.Module`` (the tree is built with :func:`hf_camhd.build_hierarchy`), an
            :class:`~hf_camhd.LRTree` built from a live model, ``model.named_parameters()``, or plain
            tensors / param groups (then: global + one layer per tensor, no block level). Frozen
            tensors are left out.
        levels: an ordered subset of ``("global", "block", "layer", "unit", "parameter")`` starting with
            ``global`` (ignored when ``tree`` is given, which must then have these levels).
        gamma: initial combination weights γ₀, one per level in ``levels`` order (default uniform);
            normalised to sum to 1.
        hypergrad_lr: β, the hyper-gradient rate of the global level (spec §4).
        gamma_lr: δ, the rate of γ (0 keeps γ fixed).
        decay_rate: r in τ(t) = exp(−r t), t = completed steps (0: no decay, κ = α*).
        alpha_inf: α_∞, the rate κ tends to as τ → 0 (default ``lr``).
        hypergrad_scaling: ``"equal"`` — β_j[n] = β·N/N_n (every level moves at the global level's
            scale; default) — or ``"sum"`` — β for every node.
        gamma_update: ``"clamp"`` (γ − δG clamped at 0 and renormalised, the paper's rule) or
            ``"softmax"`` (γ = softmax(c), gradient step on the logits c).
        alpha_min, alpha_max: floor and ceiling of every learned α (defaults 0 and ``1000 * lr``);
            a step whose hyper-gradient is non-finite keeps the previous α and γ.
        maximize: maximise the objective instead of minimising it.
        tree: an explicit :class:`~hf_camhd.LRTree` for the given params (matched by parameter name).
        foreach: ``True`` uses the multi-tensor (foreach) kernels, ``False`` the plain reference (one
            tensor at a time). Default: fused where it applies, foreach elsewhere.
        fused: ``True`` requires the fused CPU kernel (two passes over memory per step for CAM-HD and the
            base rule together; :mod:`hf_camhd.optim._fused`) and raises where a step cannot use it; ``False``
            never uses it. The default (``None``, with ``foreach=None``) uses it for CPU float32 / float64
            contiguous tensors (units along dim 0, i.e. every layer but GPT-2-style ``Conv1D``), when a C
            compiler is available (compiled once and cached), and the foreach kernels otherwise. Like torch's ``fused`` and ``foreach``, it
            changes the arithmetic order, not the maths: results agree to rounding.
"""


class CAMHDSGD(CAMHDOptimizer):
    __doc__ = """SGD (plain, momentum or Nesterov) with CAM-HD learned learning rates.

    Base direction (``torch.optim.SGD``): ``d = g + λθ``; with momentum μ, ``b = μ b + (1 − dampening) d``
    and ``d = b`` (Nesterov: ``d = g + μ b``). With ``hypergrad_lr=0, gamma_lr=0`` it reproduces
    ``torch.optim.SGD``; a global-only tree is Baydin et al.'s SGD-HD.

    Example::

        >>> import torch
        >>> from hf_camhd import CAMHDSGD
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = CAMHDSGD(model, lr=0.1, momentum=0.9, nesterov=True, levels=("global", "layer"),
        ...                hypergrad_lr=1e-3)
        >>> loss = model(torch.randn(16, 4)).pow(2).mean(); loss.backward(); opt.step()
        >>> opt.alpha("layer").shape
        torch.Size([2])
    """ + _CAMHD_DOC

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, levels: Sequence[str] | str | None = ("global", "layer"),
                 gamma: Sequence[float] | None = None, hypergrad_lr: float = 1e-3, gamma_lr: float = 0.0,
                 decay_rate: float = 0.0, alpha_inf: float | None = None, hypergrad_scaling: str = "equal",
                 gamma_update: str = "clamp", alpha_min: float = 0.0, alpha_max: float | None = None,
                 dampening: float = 0.0, maximize: bool = False, *, tree: LRTree | None = None,
                 foreach: bool | None = None, fused: bool | None = None):
        check_momentum(momentum, dampening, nesterov)
        check_nonnegative("weight_decay", weight_decay)
        self.rule = SGDRule()
        defaults = dict(lr=lr, momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
                        weight_decay=float(weight_decay))
        super().__init__(params, defaults, levels=levels if tree is None else None, gamma=gamma,
                         hypergrad_lr=hypergrad_lr, gamma_lr=gamma_lr, decay_rate=decay_rate, alpha_inf=alpha_inf,
                         hypergrad_scaling=hypergrad_scaling, gamma_update=gamma_update, alpha_min=alpha_min,
                         alpha_max=alpha_max, maximize=maximize, tree=tree, foreach=foreach,
                         fused=fused)


class CAMHDAdam(CAMHDOptimizer):
    __doc__ = """Adam with CAM-HD learned learning rates (L2 ``weight_decay`` added to g, as torch.optim.Adam).

    Base direction: ``d = m̂ / (sqrt(v̂) + ε)`` (``amsgrad`` uses the running max of v̂). With
    ``hypergrad_lr=0, gamma_lr=0`` it reproduces ``torch.optim.Adam``; a global-only tree is
    Baydin et al.'s Adam-HD.

    Example::

        >>> import torch
        >>> from hf_camhd import CAMHDAdam
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 10))
        >>> opt = CAMHDAdam(model, lr=1e-3, levels=("global", "unit"), gamma=(0.8, 0.2),
        ...                 hypergrad_lr=1e-8, gamma_lr=0.03, decay_rate=0.002)
        >>> loss = model(torch.randn(8, 1, 14, 14)).logsumexp(1).mean(); loss.backward(); opt.step()
        >>> round(float(opt.gamma.sum()), 6)
        1.0
    """ + _CAMHD_DOC

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, levels: Sequence[str] | str | None = ("global", "layer"),
                 gamma: Sequence[float] | None = None, hypergrad_lr: float = 1e-8, gamma_lr: float = 0.0,
                 decay_rate: float = 0.0, alpha_inf: float | None = None, hypergrad_scaling: str = "equal",
                 gamma_update: str = "clamp", alpha_min: float = 0.0, alpha_max: float | None = None,
                 amsgrad: bool = False, maximize: bool = False, *, tree: LRTree | None = None,
                 foreach: bool | None = None, fused: bool | None = None):
        betas = check_betas(betas)
        eps = check_eps(eps)
        check_nonnegative("weight_decay", weight_decay)
        self.rule = AdamRule(decoupled=self.decoupled)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=float(weight_decay), amsgrad=bool(amsgrad))
        super().__init__(params, defaults, levels=levels if tree is None else None, gamma=gamma,
                         hypergrad_lr=hypergrad_lr, gamma_lr=gamma_lr, decay_rate=decay_rate, alpha_inf=alpha_inf,
                         hypergrad_scaling=hypergrad_scaling, gamma_update=gamma_update, alpha_min=alpha_min,
                         alpha_max=alpha_max, maximize=maximize, tree=tree, foreach=foreach,
                         fused=fused)


class CAMHDAdamW(CAMHDAdam):
    __doc__ = """AdamW (decoupled weight decay) with CAM-HD learned learning rates.

    Base direction: ``d = m̂ / (sqrt(v̂) + ε) + λ θ_{t-1}`` — the decay is part of what the learned
    rate scales (spec §2). With ``hypergrad_lr=0, gamma_lr=0`` it reproduces ``torch.optim.AdamW``.

    Example::

        >>> import torch
        >>> from hf_camhd import CAMHDAdamW
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = CAMHDAdamW(model, lr=1e-3, weight_decay=1e-2, levels="global,layer,parameter")
        >>> model(torch.randn(3, 4)).sum().backward(); opt.step()
    """ + _CAMHD_DOC

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, levels: Sequence[str] | str | None = ("global", "layer"),
                 gamma: Sequence[float] | None = None, hypergrad_lr: float = 1e-8, gamma_lr: float = 0.0,
                 decay_rate: float = 0.0, alpha_inf: float | None = None, hypergrad_scaling: str = "equal",
                 gamma_update: str = "clamp", alpha_min: float = 0.0, alpha_max: float | None = None,
                 amsgrad: bool = False, maximize: bool = False, *, tree: LRTree | None = None,
                 foreach: bool | None = None, fused: bool | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, levels, gamma, hypergrad_lr, gamma_lr, decay_rate,
                         alpha_inf, hypergrad_scaling, gamma_update, alpha_min, alpha_max, amsgrad, maximize,
                         tree=tree, foreach=foreach, fused=fused)

