"""CAM-HD optimizers: ``CAMHDSGD``, ``CAMHDAdam``, ``CAMHDAdamW`` (``docs/algorithm.md`` §1–§4).

CAM-HD (combined adaptive multi-level hyper-gradient descent) learns the learning rate by
hyper-gradient descent at several levels of a network at once and mixes them with learned weights::

    h_p       = g_{t,p} · u_{t-1,p}                       (u: ∂θ_{t-1}/∂α*, the last update's derivative)
    α_j[n]   ← α_j[n] − β_j[n] · γ_j · Σ_{p∈n} h_p        (every level j, node n; β_j[n] = β·N/N_n)
    γ_j      ← γ_j − δ · Σ_n α_j[n] Σ_{p∈n} h_p,  then clamp at 0 and renormalise (or softmax logits)
    α*_p      = Σ_j γ_j · α_j[node_j(p)]
    κ_t       = τ(t) α* + (1 − τ(t)) α_∞,   τ(t) = exp(−r t),  t = 1, 2, …
    θ_t       = θ_{t-1} − s_t κ_t ⊙ d_t,    u_t = −s_t τ(t) d_t

with ``d_t`` the base optimizer's direction (:mod:`hf_camhd.optim.base_rules`) and
``s_t = group["lr"] / lr`` the scheduler's multiplier. Symbols ↔ arguments: α₀ = ``lr``,
β = ``hypergrad_lr``, δ = ``gamma_lr``, r = ``decay_rate``, α_∞ = ``alpha_inf``, γ₀ = ``gamma``.

Reference: "Adaptive Multi-level Hyper-gradient Descent" (ICLR 2021 submission); Baydin et al.,
"Online Learning Rate Adaptation with Hypergradient Descent", ICLR 2018 (the global-only tree).

The class gathers the tensors of a step and their state; the maths is in
:func:`hf_camhd.optim._functional.camhd_step`, which dispatches once per step to a plain reference,
a multi-tensor (foreach) or a fused implementation. State keys are named in
:mod:`hf_camhd.optim._state`; sharded parameters (FSDP2) are handled by a strategy object of
:mod:`hf_camhd.optim.sharding` chosen at the first step.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..hierarchy import LRTree
from . import _fused
from ._functional import camhd_step, compiled_unavailable_reason, value
from ._params import extend_tree, names_for, resolve_params
from ._stats import lr_stats
from ._state import (NORMALIZED_GAMMA_LR, NORMALIZED_HYPERGRAD_LR, NORMALIZED_HYPERGRAD_LR_BOUND, ALPHA_OFFSET, ALPHA_UNIT, COARSE_LEVELS, DIR, DIR_SCALE, GAMMA, GAMMA_GRAD, GAMMA_LOGITS,
                     HYPER_GROUP_KEYS, RULES, STATS_CHANNELS, UNIT_STATS, stats_key,
                     HYPER_PARAM_KEYS, LAST_LR_SCALE, LR0, PREFIX, SKIPPED, STEP, TREE, HyperConfig, HyperState,
                     StepTensors, alpha_key, build_tree_index, hyper_dtype)
from .base_rules import AdamRule, BaseRule, SGDRule
from .sharding import check_not_flattened, choose_sharding, is_dtensor
from .validation import (GAMMA_UPDATES, HYPERGRAD_SCALINGS, check_alpha_bounds, check_betas, check_choice, check_eps,
                         check_bool, check_flag, check_gamma, check_lr, check_momentum,
                         check_nonnegative)

__all__ = ["CAMHDAdam", "CAMHDAdamW", "CAMHDOptimizer", "CAMHDSGD"]


class CAMHDOptimizer(Optimizer):
    """Shared CAM-HD step-size layer over a :class:`~hf_camhd.optim.base_rules.BaseRule`.

    Use :class:`CAMHDSGD`, :class:`CAMHDAdam` or :class:`CAMHDAdamW`; a new base optimizer is a
    subclass that sets ``rule`` and validates its own arguments.
    """

    rule: BaseRule
    additive_hypergrad_lr: float = 1e-8
    """The default β of the additive rule (the paper's value for this base)."""

    def __init__(self, params: Any, defaults: dict, *, levels, gamma, hypergrad_lr, gamma_lr, decay_rate,
                 alpha_inf, hypergrad_scaling, gamma_update, alpha_min, alpha_max, maximize, tree, foreach,
                 fused=None, hypergrad_rule="normalized", hypergrad_smoothing=0.9):
        lr = check_lr(defaults["lr"])
        check_choice("hypergrad_rule", hypergrad_rule, RULES)
        hypergrad_lr, gamma_lr = self._rule_defaults(hypergrad_rule, hypergrad_lr, gamma_lr)
        decay_rate = check_nonnegative("decay_rate", decay_rate)
        check_choice("hypergrad_scaling", hypergrad_scaling, HYPERGRAD_SCALINGS)
        check_choice("gamma_update", gamma_update, GAMMA_UPDATES)
        hypergrad_smoothing = check_nonnegative("hypergrad_smoothing", hypergrad_smoothing)
        if hypergrad_smoothing >= 1:
            raise ValueError(f"Invalid hypergrad_smoothing value: {hypergrad_smoothing} (must be in [0, 1): the weight "
                             "of the past in the smoothed hyper-gradient statistics)")
        alpha_min, alpha_max = check_alpha_bounds(alpha_min, alpha_max, lr)
        alpha_inf = lr if alpha_inf is None else check_nonnegative("alpha_inf", alpha_inf)
        foreach, fused = check_flag("foreach", foreach), check_flag("fused", fused)
        if foreach and fused:
            raise ValueError("Invalid fused: True together with foreach=True; pick one (the default, both None, "
                             "uses the fused kernels where they apply and foreach elsewhere)")
        check_bool("maximize", maximize)
        groups, tree = resolve_params(params, levels, tree)
        gamma0 = check_gamma(gamma, tree.levels, gamma_update)
        super().__init__(groups, dict(defaults, maximize=bool(maximize)))
        self.tree: LRTree = tree
        self.config = HyperConfig(tree.levels, lr, hypergrad_lr, gamma_lr, decay_rate, float(alpha_inf),
                                  hypergrad_scaling, gamma_update, alpha_min, alpha_max, hypergrad_rule,
                                  hypergrad_smoothing)
        self.foreach = True if foreach is None else foreach
        # fused: True = required (a step that cannot be fused raises, naming why), None = wherever it applies
        # (the default when neither is chosen), False = never; an explicit foreach=True / False is honoured
        self.fused: bool | None = fused if fused is not None else (None if foreach is None else False)
        self._reset_caches()
        self._init_group_state(gamma0)
        self._register_hooks()

    def _rule_defaults(self, rule: str, hypergrad_lr, gamma_lr) -> tuple[float, float]:
        """β and δ: the given values, else the rule's defaults (normalized: β = 0.01, δ = 0.01; additive: this
        base's paper β and a fixed γ, δ = 0). The normalized rule's β is the fraction a rate may move per step:
        it must be below 1 (where a rate stays positive), and a β below 1e-5 is almost surely an additive-rule β:
        say so."""
        normalized = rule == "normalized"
        if hypergrad_lr is None:
            hypergrad_lr = NORMALIZED_HYPERGRAD_LR if normalized else self.additive_hypergrad_lr
        if gamma_lr is None:
            gamma_lr = NORMALIZED_GAMMA_LR if normalized else 0.0
        hypergrad_lr = check_nonnegative("hypergrad_lr", hypergrad_lr)
        gamma_lr = check_nonnegative("gamma_lr", gamma_lr)
        if normalized and hypergrad_lr >= NORMALIZED_HYPERGRAD_LR_BOUND:
            raise ValueError(f"Invalid hypergrad_lr value: {hypergrad_lr:g} with hypergrad_rule='normalized' (must be "
                             "in [0, 1)): this rule's step is α ← α (1 − β c) with the cosine c in [−1, 1], so at β ≥ 1 "
                             "one step can set a rate to 0 (or below alpha_min), and a rate at 0 never moves again. "
                             f"Use a fraction, e.g. the default {NORMALIZED_HYPERGRAD_LR:g}; for the paper's additive "
                             "rule and its β, pass hypergrad_rule='additive'.")
        if normalized and 0 < hypergrad_lr < 1e-5:
            warnings.warn(f"{type(self).__name__}: hypergrad_lr={hypergrad_lr:g} with hypergrad_rule='normalized' (the "
                          f"default) lets a learned rate move by at most {hypergrad_lr:g} of itself per step, so it "
                          f"barely adapts: this rule's β is dimensionless (default {NORMALIZED_HYPERGRAD_LR:g}). For "
                          "the paper's additive rule and its β, pass hypergrad_rule='additive'.", UserWarning,
                          stacklevel=3 + _init_depth(type(self)))
        return hypergrad_lr, gamma_lr

    def _reset_caches(self) -> None:
        """Everything derived from the state and recomputed on demand (never saved, pickled or copied)."""
        self._index_cache: dict = {}
        self._sharding = None
        self._stash: dict = {}
        self._last_hyper: dict = {}
        self._last_path: str | None = None  # the implementation the last step ran ("fused_cpu", "multi_tensor", ...)
        self._forced_implementation: str | None = None  # for tests, e.g. "compiled" (the CUDA fused path) on CPU
        self._rates_warned = False
        self._fused_checked: dict = {}  # state tensors already found fused-eligible -> the parameter's layout

    def _register_hooks(self) -> None:
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)

    # ------------------------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["camhd"] = dict(tree=self.tree.to_dict(), config=self.config, rule=self.rule, foreach=self.foreach,
                              fused=self.fused)
        return state

    def __setstate__(self, state: dict) -> None:
        extra = state.pop("camhd", None)  # absent when load_state_dict calls this with state and groups only
        super().__setstate__(state)
        if extra is None:
            return
        self.tree = LRTree.from_dict(extra["tree"])
        self.config, self.rule = extra["config"], extra["rule"]
        self.foreach, self.fused = extra["foreach"], extra["fused"]
        self._reset_caches()
        self._register_hooks()

    # ------------------------------------------------------------------------------------ state
    def _flat_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _home(self) -> tuple[torch.device, torch.dtype]:
        """Device and dtype of the model-wide hyper-state (float64 when any parameter is float64)."""
        params = self._flat_params()
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        return params[0].device, dtype

    def _init_group_state(self, gamma0: list[float]) -> None:
        device, dtype = self._home()
        g0, lr = self.param_groups[0], self.config.lr
        g0[STEP] = torch.zeros((), dtype=torch.float64)
        g0[SKIPPED] = torch.zeros((), dtype=torch.int64, device=device)
        g0[LR0] = lr
        g0[GAMMA] = torch.tensor(gamma0, dtype=dtype, device=device)
        if self.config.gamma_update == "softmax":
            g0[GAMMA_LOGITS] = torch.log(g0[GAMMA])
        for lv in COARSE_LEVELS:
            if lv in self.tree.levels:
                g0[alpha_key(lv)] = torch.full((self.tree.num_nodes(lv),), lr, dtype=dtype, device=device)
        g0[TREE] = self.tree.to_dict()
        self._init_rule_state()

    def _init_rule_state(self) -> None:
        """The normalized rule's smoothed sums per coarse node and its smoothed ∂f/∂γ (zeros; also after loading a
        state dict that has none, or after add_param_group added nodes)."""
        if not self.config.normalized:
            return
        g0 = self.param_groups[0]
        gamma = g0[GAMMA]
        for lv in COARSE_LEVELS:
            if lv in self.tree.levels:
                n, old = self.tree.num_nodes(lv), g0.get(stats_key(lv))
                extra = gamma.new_zeros(n - (0 if old is None else old.shape[0]), STATS_CHANNELS)
                g0[stats_key(lv)] = extra if old is None else torch.cat([old, extra])
        if GAMMA_GRAD not in g0:
            g0[GAMMA_GRAD] = torch.zeros_like(gamma)

    def _hyper_state(self) -> HyperState:
        g0 = self.param_groups[0]
        coarse = {lv: g0[alpha_key(lv)] for lv in COARSE_LEVELS if alpha_key(lv) in g0}
        stats = {lv: g0[stats_key(lv)] for lv in COARSE_LEVELS if stats_key(lv) in g0}
        return HyperState(g0[GAMMA], coarse, g0[SKIPPED], g0.get(GAMMA_LOGITS), stats, g0.get(GAMMA_GRAD))

    def _tree_index(self, flat: list[Tensor]):
        """β per node and node indices, for the tensors trainable now (rebuilt when that set changes), on the
        hyper-state's device and in its dtype."""
        gamma = self.param_groups[0][GAMMA]
        device, dtype = gamma.device, gamma.dtype
        trainable = tuple(p.requires_grad for p in flat)
        key = (device, dtype, trainable)
        if key not in self._index_cache:
            if len(self._index_cache) > 8:
                self._index_cache.clear()
            self._index_cache[key] = build_tree_index(self.tree, self.config, list(trainable), device, dtype)
        return self._index_cache[key]

    def _init_param_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        self.rule.init_state(p, state, group)
        hd = hyper_dtype(p.dtype)
        fresh = DIR_SCALE not in state  # the tensor's first step: no previous direction
        if fresh:
            state[DIR_SCALE] = torch.zeros((), dtype=hd, device=p.device)
        if DIR not in state and not self.rule.derives_direction(group):
            # note: the previous direction is kept only where the base rule cannot rebuild it from its own state
            # (Adam's moments, SGD's heavy-ball buffer). After a change of settings that ends that (momentum →
            # Nesterov) it is rebuilt once more, from the state as it stands, and kept from then on.
            state[DIR] = torch.zeros_like(p, dtype=hd, memory_format=torch.preserve_format)
            if not fresh:
                state[DIR].copy_(self.rule.previous_directions([p], [state], group)[0])
        if "parameter" in self.tree.levels and ALPHA_OFFSET not in state:
            state[ALPHA_OFFSET] = torch.zeros_like(p, dtype=hd, memory_format=torch.preserve_format)
        return state

    def _unit_vector(self, gi: int, flat: list[Tensor], sharding, key: str = ALPHA_UNIT) -> Tensor:
        """A per-unit state tensor of unit group ``gi``, kept on the tensor owning the group's units and created on
        first use: the unit level's α (at α₀) or, with the normalized rule, its smoothed sums (zeros, 3 per unit)."""
        group = self.tree.unit_groups[gi]
        owner = flat[group.owner]
        state = self.state[owner]
        if key not in state:
            members = [(m, flat[m], dim) for m, dim in group.members]
            shape, value = ((group.count,), self.config.lr) if key == ALPHA_UNIT else ((group.count, STATS_CHANNELS), 0.0)
            state[key] = sharding.new_unit_vector(owner, members, shape, value, hyper_dtype(owner.dtype))
        return state[key]

    def _lr_scale(self, group: dict):
        """s = group["lr"] / α₀: the scheduler's multiplier on the learned rates."""
        return value(group["lr"]) / self.param_groups[0][LR0]

    # ------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one CAM-HD step (``docs/algorithm.md`` §4). ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = self._flat_params()
        sharding = self._get_sharding(flat)
        if self._is_state_init_step(sharding, flat):
            self._create_state(sharding, flat)
            return loss
        step = self._gather(sharding, flat)
        if step is None:
            return loss
        impl = self._implementation(step, sharding)
        t = self._count_step(step, compiled=impl == "compiled")
        self._last_hyper = camhd_step(step, self._hyper_state(), self._tree_index(flat), self.config, self.rule, t,
                                      sharding, impl=impl)
        self._last_path = impl
        for state in step.stale_dirs or ():  # this step's direction is rebuilt from the base state from now on
            del state[DIR]
        self._watch_rates(t)
        return loss

    def _watch_rates(self, t=None, *, every_step: bool = False, stacklevel: int = 5) -> None:
        """Warn once when a learned rate reaches ``alpha_max``, or grows 100× above α₀ in its first 20 steps: the
        hyper-gradient rate is too large for this model. Reads the rates on the host at steps 1–20 and every 100th
        step when they live on the CPU, every 100th step elsewhere (and from ``lr_stats``): no sync per step."""
        if self._rates_warned or not self.config.adapts or torch.compiler.is_compiling():
            return
        t = self.num_steps if t is None else int(t)  # t: this step's number (a float, or a CPU tensor if compiled)
        on_cpu = self.param_groups[0][GAMMA].device.type == "cpu"
        if not (every_step or t % 100 == 0 or (on_cpu and t <= 20)):
            return
        cfg, lr = self.config, self.config.lr
        local = self._sharding.local if self._sharding is not None else (lambda x: x)
        for lv in self.levels:  # this rank's values only (no collective: ranks may warn at different steps)
            if lv == "parameter" and t % 100 and not every_step:
                continue  # reading every parameter's rate costs a pass over memory: every 100th step only
            if lv in COARSE_LEVELS:
                top = max(self.param_groups[0][alpha_key(lv)].tolist())  # (one op: a few nodes)
            else:
                key, add = (ALPHA_UNIT, 0.0) if lv == "unit" else (ALPHA_OFFSET, lr)
                held = [local(st[key]) for st in self.state.values() if key in st]
                top = add + max((float(x.max()) for x in held if x.numel()), default=lr - add)
            reached = top >= cfg.alpha_max * (1 - 1e-6)
            if reached or (t <= 20 and top >= 100 * lr):
                fix = (f"lower hypergrad_lr (now {cfg.hypergrad_lr:g})" + ("" if cfg.normalized else
                       ", or use hypergrad_rule='normalized', whose β does not depend on the model's scale"))
                what = (f"reached alpha_max={cfg.alpha_max:g}" if reached
                        else f"grew to {top:.3g}, {top / lr:.0f}× its initial {lr:g}, in {t} steps")
                warnings.warn(f"{type(self).__name__}: the learned rate of level {lv!r} {what} (step {t}): the "
                              f"hyper-gradient steps are too large for this model. {fix[0].upper()}{fix[1:]}; or raise "
                              "alpha_max if such rates are intended.", RuntimeWarning, stacklevel=stacklevel)
                self._rates_warned = True
                return

    def _get_sharding(self, flat: list[Tensor]):
        """The sharding strategy (chosen at the first step: FSDP2 swaps parameters in before it)."""
        check_not_flattened(self, flat)
        if self._sharding is None:
            self._sharding = choose_sharding(flat, self.tree)
        return self._sharding

    def _count_step(self, step: StepTensors, *, compiled: bool):
        """Count this step; return its number t (1 on the first step) as the step's arithmetic needs it:
        a Python float, or — for the compiled implementation — CPU tensors for t and every group's s, so
        that the compiled graph neither recompiles nor syncs when they change."""
        g0 = self.param_groups[0]
        g0[STEP].add_(1)
        g0[LAST_LR_SCALE] = self._lr_scale(g0)
        if not compiled:
            return value(g0[STEP])
        step.groups = [(g, m, torch.as_tensor(s, dtype=torch.float64)) for g, m, s in step.groups]
        return g0[STEP]

    def _gather(self, sharding, flat: list[Tensor]) -> StepTensors | None:
        """The tensors with a gradient, their (lazily created) state and per-group multipliers, as local views."""
        levels = self.tree.levels
        unit, param = "unit" in levels, "parameter" in levels
        st = StepTensors([], [], [], [], [], [], [], stored=[])
        if unit:
            st.unit_groups, st.unit_dims, st.unit_ranges, st.unit_vectors = [], [], [], {}
            st.unit_stats = {} if self.config.normalized else None
        if param:
            st.offsets = []
        i = 0
        for group in self.param_groups:
            members = []
            for p in group["params"]:
                i += 1
                if p.grad is None:
                    if p in self.state and DIR_SCALE in self.state[p]:
                        self.state[p][DIR_SCALE].zero_()  # note: a tensor that did not move has u = 0 next time
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (parameter "
                                       f"{self.tree.entries[i - 1].name!r}); use dense gradients, e.g. "
                                       "nn.Embedding(..., sparse=False)")
                self._add_tensor(st, i - 1, p, group, sharding, flat)
                members.append(len(st.params) - 1)
            if members:
                st.groups.append((group, members, self._lr_scale(group)))
        return st if st.params else None

    def _add_tensor(self, st: StepTensors, i: int, p: Tensor, group: dict, sharding, flat: list[Tensor]) -> None:
        state = self._init_param_state(p, group)
        view = sharding.views(state, p)
        grad = sharding.local(p.grad)
        st.index.append(i)
        st.stored.append(p)
        st.params.append(sharding.local(p))
        st.grads.append(-grad if group["maximize"] else grad)
        st.states.append(view)
        st.dirs.append(view.get(DIR))
        if DIR in state and self.rule.derives_direction(group):  # e.g. from a checkpoint of an older version
            st.stale_dirs = (st.stale_dirs or []) + [state]
        st.dir_scales.append(view[DIR_SCALE])
        if st.offsets is not None:
            st.offsets.append(view[ALPHA_OFFSET])
        if st.unit_groups is not None:
            gi, dim = self.tree.entry_unit_group[i], self.tree.entries[i].unit_dim if p.ndim else 0
            st.unit_groups.append(gi)
            st.unit_dims.append(dim)
            st.unit_ranges.append(sharding.unit_range(i, p, dim))
            if gi not in st.unit_vectors:
                alpha = self._unit_vector(gi, flat, sharding)
                st.unit_vectors[gi] = (sharding.local(alpha), sharding.alpha_start(alpha))
                if st.unit_stats is not None:
                    st.unit_stats[gi] = sharding.local(self._unit_vector(gi, flat, sharding, UNIT_STATS))

    def _implementation(self, step: StepTensors, sharding) -> str:
        """Which implementation runs this step (see the ``foreach`` / ``fused`` arguments)."""
        if torch.compiler.is_compiling():
            return "multi_tensor"  # the caller's torch.compile traces the multi-tensor step
        if self._forced_implementation is not None:  # tests: run a device's implementation on another device
            return self._forced_implementation
        if self.foreach is False:
            if sharding.sharded:
                raise NotImplementedError(f"{type(self).__name__}(foreach=False) does not support sharded "
                                          "(FSDP2 / DTensor) parameters; use the default foreach=True")
            return "reference"
        why_not, impl = self._why_not_fused(step, sharding)
        if why_not is None:
            return impl
        if self.fused:
            raise RuntimeError(f"{type(self).__name__}(fused=True) cannot fuse this step: {why_not}. Use fused=None "
                               "(the default: fused where it applies, foreach elsewhere) or foreach=True.")
        return "multi_tensor"

    def _why_not_fused(self, step: StepTensors, sharding) -> tuple[str | None, str]:
        """Why this step cannot take a fused path (or ``None``), and which fused path applies."""
        if self.fused is False:
            return ("fused=False" if self.foreach is None else f"foreach={self.foreach} was chosen"), ""
        if sharding.sharded:
            return "the parameters are sharded (DTensor)", ""
        gamma = self.param_groups[0][GAMMA]
        if gamma.is_cpu and all(p.is_cpu for p in step.params):
            return self._why_not_fused_cpu(step), "fused_cpu"
        devices = {p.device.type for p in step.params} | {gamma.device.type}
        if devices == {"cuda"}:
            return compiled_unavailable_reason(), "compiled"
        return f"the tensors are on {', '.join(sorted(devices))} (fused kernels: CPU, or CUDA through torch.compile)", ""

    def _why_not_fused_cpu(self, step: StepTensors) -> str | None:
        if self.rule.fused_state_keys is None:
            return f"the {self.rule.name} rule has no fused kernel"
        if step.unit_dims is not None:
            for i, dim in zip(step.index, step.unit_dims):
                if dim != 0:
                    return (f"{self.tree.entries[i].name!r} has its units along dim {dim} (the fused "
                            "kernels take units along dim 0)")
        if _fused.load() is None:
            if self.fused is None:
                _fused.warn_unavailable_once()
            return f"the fused kernels are unavailable ({_fused.unavailable_reason()})"
        why = self._why_not_fused_hyper_state(step)
        if why:
            return why
        keys = self.rule.fused_state_keys
        offsets = step.offsets if step.offsets is not None else [None] * len(step.params)
        for k, (p, g, st, d, off) in enumerate(zip(step.params, step.grads, step.states, step.dirs, offsets)):
            # note: a parameter whose state passed once is only checked against its new gradient (a fast check)
            seen = (id(p), id(d), id(off), *[id(st.get(key)) for key in keys])
            fmt = self._fused_checked.get(seen)
            if fmt is not None and g.dtype == p.dtype and g.is_cpu and g.is_contiguous(memory_format=fmt):
                continue
            state = [(DIR, d), (ALPHA_OFFSET, off), *((key, st.get(key)) for key in keys)]
            why = _fused.ineligible_reason([("the parameter", p), ("its gradient", g), *state])
            if not why and step.dir_scales[k].dtype != p.dtype:  # the kernels write u's factor in the param's dtype
                why = f"{DIR_SCALE} has dtype {step.dir_scales[k].dtype}, the parameter {p.dtype}"
            if why:
                return f"{self.tree.entries[step.index[k]].name!r}: {why}"
            self._fused_checked[seen] = _fused.memory_format(p)
        return None

    def _why_not_fused_hyper_state(self, step: StepTensors) -> str | None:
        """The C hyper-update reads the hyper-state through data pointers: every tensor of it must be a contiguous
        CPU tensor of γ's dtype (as created; a state dict of other dtypes is cast on loading)."""
        hyper = self._hyper_state()
        dtype = hyper.gamma.dtype
        named = [("γ", hyper.gamma), ("the γ logits", hyper.gamma_logits), ("the smoothed ∂f/∂γ", hyper.gamma_grad),
                 *((f"α of level {lv!r}", a) for lv, a in hyper.coarse.items()),
                 *((f"the smoothed sums of level {lv!r}", x) for lv, x in hyper.stats.items()),
                 *(("a unit group's α", a) for a, _ in (step.unit_vectors or {}).values()),
                 *(("a unit group's smoothed sums", x) for x in (step.unit_stats or {}).values())]
        for what, t in named:
            if t is not None and (t.dtype != dtype or not t.is_contiguous() or not t.is_cpu):
                return (f"{what} is a {t.dtype} {'' if t.is_contiguous() else 'non-contiguous '}tensor on {t.device} "
                        f"(the fused hyper-update takes contiguous CPU tensors of γ's dtype {dtype})")
        return None

    # ------------------------------------------------------------------------------------ state-creating step
    def _is_state_init_step(self, sharding, flat: list[Tensor]) -> bool:
        """``torch.distributed.checkpoint.state_dict`` creates missing state by calling ``step()`` once with
        zero gradients and every group's ``lr`` set to 0 (``_init_optim_state``). That call must change
        nothing — no step counted, no moments, no hyper-update — so it only creates the state."""
        if self.state or torch.compiler.is_compiling() or any(value(g["lr"]) != 0 for g in self.param_groups):
            return False
        with_grad = [(i, p.grad) for i, p in enumerate(flat) if p.grad is not None]
        return bool(with_grad) and not sharding.any_nonzero(with_grad)

    def _create_state(self, sharding, flat: list[Tensor]) -> None:
        """Create every per-parameter state entry a real step would (zeros / α₀), changing nothing else."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_param_state(p, group)
                if isinstance(self.rule, SGDRule) and group["momentum"] != 0 and "momentum_buffer" not in state:
                    # note: torch.optim.SGD creates its buffer in this call too (zeros, as the grads are zero)
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "unit" in self.tree.levels:
            for gi, group in enumerate(self.tree.unit_groups):
                if flat[group.owner].grad is not None:
                    self._unit_vector(gi, flat, sharding)
                    if self.config.normalized:
                        self._unit_vector(gi, flat, sharding, UNIT_STATS)

    # ------------------------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        """Add a param group (``torch.optim`` semantics); its tensors join the tree as new nodes.

        Each new tensor gets its own parameter and unit nodes, a layer node (its module's path, when the
        model is known, or its name) and — in a tree with blocks — a new block ``param_group{k}``, all
        under the global node and starting at α₀. A checkpoint taken afterwards loads into an optimizer
        to which the same group was added.
        """
        if not hasattr(self, "tree"):  # called by Optimizer.__init__ for the initial groups
            return super().add_param_group(param_group)
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        pairs = [p for p in params if isinstance(p, tuple)]
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        k = len(self.param_groups)
        names = [p[0] for p in pairs] if len(pairs) == len(params) and pairs else (
            list(group.pop("param_names")) if "param_names" in group else names_for(tensors, self.tree))
        group["params"] = tensors
        group.pop("param_names", None)
        if "param_names" in self.param_groups[0]:
            group["param_names"] = names
        super().add_param_group(group)
        self.tree = extend_tree(self.tree, names, tensors, f"param_group{k}")
        g0 = self.param_groups[0]
        g0[TREE] = self.tree.to_dict()
        for lv in ("block", "layer"):
            if lv in self.tree.levels:
                old = g0[alpha_key(lv)]
                extra = self.tree.num_nodes(lv) - old.shape[0]
                g0[alpha_key(lv)] = torch.cat([old, old.new_full((extra,), self.config.lr)])
        self._init_rule_state()
        self._index_cache.clear()
        self._sharding = None

    # ------------------------------------------------------------------------------------ reading
    @property
    def levels(self) -> tuple[str, ...]:
        """The tree's levels, coarse to fine (``global`` first)."""
        return self.tree.levels

    @property
    def gamma(self) -> Tensor:
        """The combination weights γ (one per level, ≥ 0, summing to 1) as a 1-D fp32 tensor."""
        return self.param_groups[0][GAMMA].detach().to(torch.float32, copy=True)

    @property
    def num_steps(self) -> int:
        """Number of CAM-HD steps taken (the number t of the last step)."""
        return int(self.param_groups[0][STEP])

    @property
    def skipped_steps(self) -> int:
        """Number of steps whose hyper-update was skipped because the hyper-gradient Σh was not finite (α of the
        node levels and γ kept their values; the parameter level, element-wise, moved where its own h was finite)."""
        return int(self.param_groups[0][SKIPPED])

    def hypergrad_direction(self, p: Tensor) -> Tensor | None:
        """``u`` of parameter ``p`` after the last step: how that step moved ``p`` per unit of learned rate
        (``∂θ/∂α``, ``docs/algorithm.md`` §3), which the next hyper-gradient ``h = g ⊙ u`` is taken against.
        ``None`` before ``p``'s first step.

        The state keeps ``u`` as a 0-d factor (``hypergrad_dir_scale``) times a direction. Where the base rule can
        rebuild that direction from its own state — Adam's ``m / (sqrt(v) + ε')``, SGD's heavy-ball buffer — it is
        not stored (one parameter-sized buffer less); this method rebuilds it.

        Example::

            opt.step()
            u = opt.hypergrad_direction(model.weight)   # same shape as the weight, in the hyper dtype
        """
        state = self.state.get(p)
        if not state or DIR_SCALE not in state:
            return None
        d = state.get(DIR)
        if d is None:
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            d = self.rule.previous_directions([p], [state], group)[0]
        return state[DIR_SCALE] * d.to(state[DIR_SCALE].dtype)

    def alpha(self, level: str, *, dtype: torch.dtype | None = torch.float32) -> Tensor:
        """Every node's learned rate α at ``level`` as a 1-D tensor (fp32 by default).

        For ``unit`` and ``parameter`` the nodes are concatenated in parameter order; nodes whose
        tensors never received a gradient still hold ``lr``.
        """
        self.tree._check_level(level)
        g0 = self.param_groups[0]
        if level in COARSE_LEVELS:
            out = g0[alpha_key(level)].detach().clone()
        else:
            flat = self._flat_params()
            device, lr = g0[GAMMA].device, self.config.lr
            if level == "unit":
                parts = [_full(self.state.get(flat[g.owner], {}).get(ALPHA_UNIT), (g.count,), lr, device, 0.0)
                         for g in self.tree.unit_groups]
            else:  # α₀ + offset evaluated in the offset's dtype (as the step does)
                parts = [_full(self.state.get(p, {}).get(ALPHA_OFFSET), (p.numel(),), lr, device, lr) for p in flat]
            out = torch.cat(parts)
        return out if dtype is None else out.to(dtype)

    def lr_stats(self) -> dict[str, float]:
        """Scalars for logging: γ per level, mean / min / max α per level, the mean effective rate
        ``s · κ`` that the last step used (its scheduler multiplier and τ) over all trainable scalars,
        and the number of skipped hyper-steps. Reads the device once."""
        self._watch_rates(every_step=True, stacklevel=3)
        return lr_stats(self)

    def __repr__(self) -> str:
        cfg = self.config
        lines = [f"{type(self).__name__} (levels: {', '.join(self.levels)}; "
                 f"{len(self.tree.entries)} tensors, {self.tree.total_numel:,} parameters)",
                 f"  hypergrad_lr: {cfg.hypergrad_lr}, gamma_lr: {cfg.gamma_lr}, decay_rate: {cfg.decay_rate}, "
                 f"alpha_inf: {cfg.alpha_inf}, hypergrad_scaling: {cfg.hypergrad_scaling}, "
                 f"gamma_update: {cfg.gamma_update}",
                 f"  gamma: {[round(x, 4) for x in self.gamma.tolist()]}"]
        for i, group in enumerate(self.param_groups):
            keys = [k for k in sorted(group) if k not in ("params", "param_names") and not k.startswith(PREFIX)]
            lines.append(f"  group {i}: " + ", ".join(f"{k}={group[k]}" for k in keys))
        return "\n".join(lines)


def _init_depth(cls: type) -> int:
    """How many ``__init__`` frames of CAM-HD subclasses stand between the user's call and the base class's."""
    return sum(1 for c in cls.__mro__ if c is not CAMHDOptimizer and issubclass(c, CAMHDOptimizer)
               and "__init__" in c.__dict__)


def _full(a: Tensor | None, shape: tuple, value_if_missing: float, device, add: float) -> Tensor:
    """A state vector as a whole float64 tensor on ``device`` (gathered when sharded), ``+ add``."""
    if a is None:
        return torch.full(shape, value_if_missing, dtype=torch.float64, device=device)
    full = getattr(a, "full_tensor", None)
    a = full() if full is not None else a
    return (a.detach() + add).reshape(-1).to(device=device, dtype=torch.float64)


# ---------------------------------------------------------------------------------- checkpoint hooks
def _load_pre_hook(opt: CAMHDOptimizer, state_dict: dict) -> dict:
    """Check the saved tree matches, and keep the fp32 hyper-state out of torch's dtype casting."""
    groups = state_dict.get("param_groups") or [{}]
    saved_tree = groups[0].get(TREE)
    if saved_tree is None:
        raise ValueError(f"{type(opt).__name__}.load_state_dict: the state dict has no CAM-HD tree "
                         f"(param_groups[0]['{TREE}']); it was not saved by a CAM-HD optimizer")
    diff = opt.tree.first_difference(saved_tree)
    if diff is not None:
        raise ValueError(f"{type(opt).__name__}.load_state_dict: the saved learning-rate tree does not match this "
                         f"model's: {diff}. Build the optimizer over the same model and levels as the checkpoint.")
    position = {pid: i for i, pid in enumerate(pid for g in groups for pid in g["params"])}
    new_state, stash = {}, {}
    for pid, entry in state_dict.get("state", {}).items():
        entry = dict(entry)
        kept = {k: entry.pop(k) for k in HYPER_PARAM_KEYS if k in entry}
        if kept and pid in position:
            stash[position[pid]] = kept
        new_state[pid] = entry
    opt._stash = stash
    return {**state_dict, "state": new_state}


def _load_post_hook(opt: CAMHDOptimizer) -> None:
    """Restore the stashed hyper-state on each param's device in fp32; put the group-0 tensors (which
    ``load_state_dict`` leaves where they were loaded) on the parameters' device; give state dicts of
    earlier versions what they lack (flags added since: their defaults; a float ``step``: a tensor)."""
    flat = opt._flat_params()
    for i, kept in opt._stash.items():
        p = flat[i]
        for k, v in kept.items():
            opt.state[p][k] = v.to(device=p.device, dtype=hyper_dtype(p.dtype))
    opt._stash = {}
    device, dtype = opt._home()
    g0 = opt.param_groups[0]
    for k in HYPER_GROUP_KEYS:
        if isinstance(g0.get(k), Tensor):
            g0[k] = g0[k].to(device=device, dtype=dtype)
    g0[STEP] = torch.as_tensor(g0[STEP], dtype=torch.float64).detach().to("cpu", copy=True).reshape(())
    g0[SKIPPED] = torch.as_tensor(g0.get(SKIPPED, 0), dtype=torch.int64).to(device, copy=True).reshape(())
    opt._init_rule_state()
    for group in opt.param_groups:
        for k, v in opt.defaults.items():
            group.setdefault(k, v)
    for state in opt.state.values():
        if "step" in state and not isinstance(state["step"], Tensor):
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
    opt._reset_caches()


_CAMHD_DOC = """
    Args:
        params: an ``nn.Module`` (the tree is built with :func:`hf_camhd.build_hierarchy`), an
            :class:`~hf_camhd.LRTree` built from a live model, ``model.named_parameters()``, or plain
            tensors / param groups (then: global + one layer per tensor, no block level). Frozen
            tensors stay in the tree (as in ``torch.optim``): they take part once they are unfrozen.
        levels: an ordered subset of ``("global", "block", "layer", "unit", "parameter")`` starting with
            ``global`` (ignored when ``tree`` is given, which must then have these levels).
        gamma: initial combination weights γ₀, one per level in ``levels`` order (default uniform);
            normalised to sum to 1.
        lr: α₀, the initial value of every learned rate (a float, or a 0-d Tensor as in ``torch.optim``: a
            scheduler then changes it in place and a compiled step does not recompile).
        hypergrad_lr: β, the hyper-gradient rate (``docs/algorithm.md`` §3–§4). With the normalized rule
            (the default) the fraction a rate may move per step, in [0, 1), default 0.01; with the additive
            rule the global level's step size on the raw hyper-gradient, default the paper's β for the base.
        gamma_lr: δ, the rate of γ (0 keeps γ fixed).
        decay_rate: r in τ(t) = exp(−r t), t = 1 on the first step (0: no decay, κ = α*).
        alpha_inf: α_∞, the rate κ tends to as τ → 0 (default ``lr``).
        hypergrad_scaling: ``"equal"`` — β_j[n] = β·N/N_n (every level moves at the global level's
            scale; default) — or ``"sum"`` — β for every node.
        gamma_update: ``"clamp"`` (γ − δG clamped at 0 and renormalised, the paper's rule) or
            ``"softmax"`` (γ = softmax(c), gradient step on the logits c).
        alpha_min, alpha_max: floor and ceiling of every learned α (defaults 0 and ``1000 * lr``);
            a step whose hyper-gradient is non-finite keeps the previous α and γ.
        maximize: maximise the objective instead of minimising it.
        hypergrad_rule: ``"normalized"`` (default) — α ← α (1 − β c̄) with c̄ the smoothed cosine of g and u
            over the node, so β is dimensionless — or ``"additive"`` — the paper's α ← α − β γ Σ g·u
            (``docs/algorithm.md`` §3.1–§3.2).
        hypergrad_smoothing: ρ in [0, 1), the weight of the past in the normalized rule's smoothed sums
            (default 0.9: about the last 10 steps).
        tree: an explicit :class:`~hf_camhd.LRTree` for the given params (matched by parameter name).
        foreach: ``True`` uses the multi-tensor (foreach) kernels, ``False`` the plain reference (one
            tensor at a time). Default: fused where it applies, foreach elsewhere.
        fused: ``True`` requires a fused implementation and raises where a step cannot use one; ``False``
            never uses one. On CPU it is two C passes over memory per tensor for CAM-HD and the base rule
            together (:mod:`hf_camhd.optim._fused`; float32 / float64 tensors stored densely, units along
            dim 0 — every layer but GPT-2-style ``Conv1D`` — and a C compiler, used once and cached); on
            CUDA it is the multi-tensor step compiled by ``torch.compile`` (inductor → Triton; the first step
            compiles). The default (``None``, with ``foreach=None``) uses it where it applies and the foreach
            kernels elsewhere. Like torch's ``fused`` and ``foreach``, it changes the arithmetic order, not
            the maths: results agree to rounding. A step inside a ``torch.compile`` of your own always runs
            the multi-tensor implementation (it has no graph breaks).
"""


class CAMHDSGD(CAMHDOptimizer):
    additive_hypergrad_lr = 1e-3
    __doc__ = """SGD (plain, momentum or Nesterov) with CAM-HD learned learning rates.

    Base direction (``torch.optim.SGD``): ``d = g + λθ``; with momentum μ, ``b = μ b + (1 − dampening) d``
    and ``d = b`` (Nesterov: ``d = g + μ b``). With ``hypergrad_lr=0, gamma_lr=0`` it reproduces
    ``torch.optim.SGD``; a global-only tree is Baydin et al.'s SGD-HD.

    Example::

        >>> import torch
        >>> from hf_camhd import CAMHDSGD
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = CAMHDSGD(model, lr=0.1, momentum=0.9, nesterov=True, levels=("global", "layer"),
        ...                hypergrad_lr=0.02)
        >>> loss = model(torch.randn(16, 4)).pow(2).mean(); loss.backward(); opt.step()
        >>> opt.alpha("layer").shape
        torch.Size([2])
    """ + _CAMHD_DOC

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, levels: Sequence[str] | str | None = ("global", "layer"),
                 gamma: Sequence[float] | None = None, hypergrad_lr: float | None = None,
                 gamma_lr: float | None = None,
                 decay_rate: float = 0.0, alpha_inf: float | None = None, hypergrad_scaling: str = "equal",
                 gamma_update: str = "clamp", alpha_min: float = 0.0, alpha_max: float | None = None,
                 dampening: float = 0.0, maximize: bool = False, hypergrad_rule: str = "normalized",
                 hypergrad_smoothing: float = 0.9, *, tree: LRTree | None = None,
                 foreach: bool | None = None, fused: bool | None = None):
        check_momentum(momentum, dampening, check_bool("nesterov", nesterov))
        check_nonnegative("weight_decay", weight_decay)
        self.rule = SGDRule()
        defaults = dict(lr=lr, momentum=float(momentum), dampening=float(dampening), nesterov=bool(nesterov),
                        weight_decay=float(weight_decay))
        super().__init__(params, defaults, levels=levels if tree is None else None, gamma=gamma,
                         hypergrad_lr=hypergrad_lr, gamma_lr=gamma_lr, decay_rate=decay_rate, alpha_inf=alpha_inf,
                         hypergrad_scaling=hypergrad_scaling, gamma_update=gamma_update, alpha_min=alpha_min,
                         alpha_max=alpha_max, maximize=maximize, tree=tree, foreach=foreach,
                         fused=fused, hypergrad_rule=hypergrad_rule, hypergrad_smoothing=hypergrad_smoothing)


class CAMHDAdam(CAMHDOptimizer):
    __doc__ = """Adam with CAM-HD learned learning rates (L2 ``weight_decay`` added to g, as torch.optim.Adam).

    Base direction: ``d = m̂ / (sqrt(v̂) + ε)`` (``amsgrad`` uses the running max of v̂). With
    ``hypergrad_lr=0, gamma_lr=0`` it reproduces ``torch.optim.Adam``; a global-only tree is
    Baydin et al.'s Adam-HD.

    Example::

        >>> import torch
        >>> from hf_camhd import CAMHDAdam
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(576, 10))
        >>> opt = CAMHDAdam(model, lr=1e-3, levels=("global", "unit"), gamma=(0.8, 0.2), decay_rate=0.002)
        >>> loss = model(torch.randn(8, 1, 14, 14)).logsumexp(1).mean(); loss.backward(); opt.step()
        >>> round(float(opt.gamma.sum()), 6)
        1.0
    """ + _CAMHD_DOC

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, levels: Sequence[str] | str | None = ("global", "layer"),
                 gamma: Sequence[float] | None = None, hypergrad_lr: float | None = None,
                 gamma_lr: float | None = None,
                 decay_rate: float = 0.0, alpha_inf: float | None = None, hypergrad_scaling: str = "equal",
                 gamma_update: str = "clamp", alpha_min: float = 0.0, alpha_max: float | None = None,
                 amsgrad: bool = False, maximize: bool = False, hypergrad_rule: str = "normalized",
                 hypergrad_smoothing: float = 0.9, *, tree: LRTree | None = None,
                 foreach: bool | None = None, fused: bool | None = None):
        betas = check_betas(betas)
        eps = check_eps(eps)
        check_bool("amsgrad", amsgrad)
        check_nonnegative("weight_decay", weight_decay)
        self.rule = AdamRule(decoupled=self.decoupled)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=float(weight_decay), amsgrad=bool(amsgrad))
        super().__init__(params, defaults, levels=levels if tree is None else None, gamma=gamma,
                         hypergrad_lr=hypergrad_lr, gamma_lr=gamma_lr, decay_rate=decay_rate, alpha_inf=alpha_inf,
                         hypergrad_scaling=hypergrad_scaling, gamma_update=gamma_update, alpha_min=alpha_min,
                         alpha_max=alpha_max, maximize=maximize, tree=tree, foreach=foreach,
                         fused=fused, hypergrad_rule=hypergrad_rule, hypergrad_smoothing=hypergrad_smoothing)


class CAMHDAdamW(CAMHDAdam):
    __doc__ = """AdamW (decoupled weight decay) with CAM-HD learned learning rates.

    Base direction: ``d = m̂ / (sqrt(v̂) + ε) + λ θ_{t-1}`` — the decay is part of what the learned
    rate scales (``docs/algorithm.md`` §2). With ``hypergrad_lr=0, gamma_lr=0`` it reproduces ``torch.optim.AdamW``.

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
                 gamma: Sequence[float] | None = None, hypergrad_lr: float | None = None,
                 gamma_lr: float | None = None,
                 decay_rate: float = 0.0, alpha_inf: float | None = None, hypergrad_scaling: str = "equal",
                 gamma_update: str = "clamp", alpha_min: float = 0.0, alpha_max: float | None = None,
                 amsgrad: bool = False, maximize: bool = False, hypergrad_rule: str = "normalized",
                 hypergrad_smoothing: float = 0.9, *, tree: LRTree | None = None,
                 foreach: bool | None = None, fused: bool | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, levels, gamma, hypergrad_lr, gamma_lr, decay_rate,
                         alpha_inf, hypergrad_scaling, gamma_update, alpha_min, alpha_max, amsgrad, maximize,
                         hypergrad_rule, hypergrad_smoothing, tree=tree, foreach=foreach, fused=fused)

