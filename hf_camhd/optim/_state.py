"""What a CAM-HD optimizer stores, by name: state keys, the hyper-parameters, and static views of the tree.

Model-wide state lives in ``param_groups[0]`` under the ``camhd_`` keys (group entries survive
``accelerate``'s ``prepare()``, FSDP2's ``get_optimizer_state_dict`` and are never cast to a bf16
parameter dtype); per-parameter state lives in ``optimizer.state[p]`` beside the base rule's buffers.
See ``docs/algorithm.md`` §4 for the maths each entry belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------- state keys
# per parameter (fp32, or float64 for float64 parameters, whatever the parameter dtype)
DIR = "hypergrad_dir"                        # d_{t-1}: the last update's direction, where kept ...
DIR_SCALE = "hypergrad_dir_scale"            # ... and its 0-d factor: u_{t-1} = DIR_SCALE · DIR
ALPHA_UNIT = "camhd_alpha_unit"              # the unit level's α of a layer (on the tensor owning its units)
ALPHA_OFFSET = "camhd_alpha_parameter_offset"  # the parameter level's α − α₀, element-wise
UNIT_STATS = "camhd_unit_hypergrad_stats"    # normalized rule: the unit level's smoothed (Σgu, Σg², Σu²), per unit
HYPER_PARAM_KEYS = (DIR, DIR_SCALE, ALPHA_UNIT, ALPHA_OFFSET, UNIT_STATS)

# model-wide, in param_groups[0]
PREFIX = "camhd_"
STEP = "camhd_step"                # completed steps (CPU float64 0-d tensor: read on the host, no device sync)
SKIPPED = "camhd_skipped_steps"    # hyper-steps skipped because the hyper-gradient was not finite
LR0 = "camhd_lr"                   # α₀, the initial value of every learned rate
LAST_LR_SCALE = "camhd_last_lr_scale"  # s = group lr / α₀ of param group 0 at the last step (for logging)
GAMMA = "camhd_gamma"              # γ, one weight per level
GAMMA_LOGITS = "camhd_gamma_logits"  # c with γ = softmax(c) (gamma_update="softmax")
GAMMA_GRAD = "camhd_gamma_hypergrad"  # normalized rule: the smoothed ∂f/∂γ
TREE = "camhd_tree"                # the learning-rate tree as plain data
COARSE_LEVELS = ("global", "block", "layer")
HYPER_GROUP_KEYS = ((GAMMA, GAMMA_LOGITS, GAMMA_GRAD) + tuple(PREFIX + "alpha_" + lv for lv in COARSE_LEVELS)
                    + tuple(PREFIX + "hypergrad_stats_" + lv for lv in COARSE_LEVELS))
"""Group-0 tensors kept in the hyper dtype on the parameters' device."""
RULES = ("normalized", "additive")
NORMALIZED_HYPERGRAD_LR = 0.01  # β of the normalized rule: the fraction a rate may move per step (docs/algorithm.md §3.2)
NORMALIZED_HYPERGRAD_LR_BOUND = 1.0  # the normalized rule's β must be below this: at 1, α (1 − β c) can reach 0 (§3.2)
NORMALIZED_GAMMA_LR = 0.01      # δ of the normalized rule
STATS_CHANNELS = 3  # normalized rule: Σ g·u, Σ g², Σ u² per node


def alpha_key(level: str) -> str:
    """The ``param_groups[0]`` key of a coarse level's α vector (``global`` / ``block`` / ``layer``)."""
    return PREFIX + "alpha_" + level


def stats_key(level: str) -> str:
    """The ``param_groups[0]`` key of a coarse level's smoothed (Σgu, Σg², Σu²) per node (normalized rule)."""
    return PREFIX + "hypergrad_stats_" + level


def hyper_dtype(dtype: torch.dtype) -> torch.dtype:
    """Hyper-state dtype for parameters of ``dtype``: float64 stays float64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------- hyper-parameters
@dataclass(frozen=True)
class HyperConfig:
    """The CAM-HD hyper-parameters as Python numbers (see the optimizer docstring for each one)."""

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
    hypergrad_rule: str = "additive"
    hypergrad_smoothing: float = 0.0

    @property
    def normalized(self) -> bool:
        """The scale-free rule (``docs/algorithm.md`` §3.2): α ← α (1 − β · smoothed cos(g, u))."""
        return self.hypergrad_rule == "normalized"

    @property
    def channels(self) -> int:
        """Sums taken per tensor / unit in step 1: Σ g·u, and (normalized rule) Σ g², Σ u²."""
        return STATS_CHANNELS if self.normalized else 1

    @property
    def adapts(self) -> bool:
        """Whether anything is learned (β > 0 or δ > 0); otherwise the step is the base optimizer's."""
        return self.hypergrad_lr > 0 or self.gamma_lr > 0

    def position(self, level: str) -> int:
        return self.levels.index(level)

    def __post_init__(self):
        # plain floats, computed once here: the step (possibly being compiled) only reads them
        bounds = {dt: _offset_bounds(self.lr, self.alpha_min, self.alpha_max, dt)
                  for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
        object.__setattr__(self, "_offset_bounds", bounds)

    def offset_bounds(self, dtype: torch.dtype) -> tuple[float, float]:
        """Bounds of a stored offset α − α₀ such that α₀ + offset, evaluated in ``dtype``, stays within
        [alpha_min, alpha_max] (α₀ rounded to ``dtype`` first, so α = alpha_min is exact)."""
        return self._offset_bounds[dtype]


def _offset_bounds(lr: float, lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float]:
    a0 = torch.tensor(lr, dtype=dtype)
    return float(torch.tensor(lo, dtype=dtype) - a0), float(torch.tensor(hi, dtype=dtype) - a0)


# ---------------------------------------------------------------------------------------- views
@dataclass
class HyperState:
    """The model-wide hyper-state: views of the tensors in ``param_groups[0]`` (updated in place)."""

    gamma: Tensor
    coarse: dict[str, Tensor]           # "global" / "block" / "layer" -> α vector
    skipped: Tensor                     # count of skipped hyper-steps
    gamma_logits: Tensor | None = None  # softmax option
    stats: dict[str, Tensor] = field(default_factory=dict)  # normalized rule: coarse level -> (nodes, 3) smoothed sums
    gamma_grad: Tensor | None = None    # normalized rule: smoothed ∂f/∂γ


@dataclass
class UnitPlan:
    """The unit rows of a step's tensors (units along dim 0, every tensor whole) laid end to end, in step order:
    ``row_tensor[r]`` is the tensor row r belongs to and ``row_unit[r]`` its unit's position in the unit groups' α
    vectors concatenated in ``groups`` order; ``counts[i]``: tensor i's rows."""

    groups: list[int]
    counts: list[int]
    row_unit: Tensor
    row_tensor: Tensor
    sizes: list[int]                    # units of each group in ``groups``


@dataclass
class TreeIndex:
    """Static per-tree tensors on one device: node indices of each entry and per-node β factors.

    ``β_j[n] = β · N / N_n`` (``"equal"`` scaling) with N and N_n counted over the tensors that are
    trainable now (``requires_grad``), so freezing or unfreezing part of the model keeps every level
    moving at the global level's scale; ``"sum"`` scaling uses β for every node.
    """

    block_of: Tensor | None             # entry -> block node
    layer_of: Tensor | None             # entry -> layer node
    beta: dict[str, Tensor]             # coarse level -> β per node
    beta_unit: list[float]              # unit group -> β of each of its units
    beta_param: float
    unit_count: list[int]               # unit group -> number of units
    unit_dims: list[int]                # entry -> dimension of its units
    _gather_cache: dict = field(default_factory=dict)

    def unit_betas(self, groups: list[int], counts: list[int], like: Tensor) -> Tensor:
        """β of every unit of ``groups`` (unit groups, ``counts[k]`` units held of group ``groups[k]``), concatenated,
        on ``like``'s device and in its dtype (cached per set of groups)."""
        key = ("unit_betas", tuple(groups), tuple(counts), like.device, like.dtype)
        hit = self._gather_cache.get(key)
        if hit is None:
            if len(self._gather_cache) > 64:
                self._gather_cache.clear()
            betas = torch.tensor([self.beta_unit[gi] for gi in groups], dtype=like.dtype, device=like.device)
            hit = betas.repeat_interleave(torch.tensor(counts, device=like.device), output_size=sum(counts))
            self._gather_cache[key] = hit
        return hit

    def unit_plan(self, unit_groups: list[int], counts: list[int], device: torch.device) -> UnitPlan:
        """Where the units of a step's tensors sit (:class:`UnitPlan`; cached per set of tensors)."""
        key = ("unit_plan", tuple(unit_groups), tuple(counts), device)
        hit = self._gather_cache.get(key)
        if hit is None:
            if len(self._gather_cache) > 64:
                self._gather_cache.clear()
            groups = list(dict.fromkeys(unit_groups))
            offset, start = {}, 0
            for gi in groups:
                offset[gi], start = start, start + self.unit_count[gi]
            row_unit = [offset[gi] + r for gi, c in zip(unit_groups, counts) for r in range(c)]
            row_tensor = [i for i, c in enumerate(counts) for _ in range(c)]
            hit = UnitPlan(groups, counts, torch.tensor(row_unit, dtype=torch.long, device=device),
                           torch.tensor(row_tensor, dtype=torch.long, device=device),
                           [self.unit_count[gi] for gi in groups])
            self._gather_cache[key] = hit
        return hit

    def nodes_of(self, index: list[int]) -> tuple[Tensor | None, Tensor | None]:
        """Block and layer node of each tensor of a step (cached per set of tensors)."""
        key = tuple(index)
        hit = self._gather_cache.get(key)
        if hit is None:
            if len(self._gather_cache) > 64:
                self._gather_cache.clear()
            ref = self.block_of if self.block_of is not None else self.layer_of
            idx = torch.tensor(index, dtype=torch.long, device=ref.device if ref is not None else None)
            hit = (self.block_of[idx] if self.block_of is not None else None,
                   self.layer_of[idx] if self.layer_of is not None else None)
            self._gather_cache[key] = hit
        return hit


def build_tree_index(tree, cfg: HyperConfig, trainable: list[bool], device: torch.device,
                     dtype: torch.dtype) -> TreeIndex:
    """β per node (algorithm §4) and node indices. ``trainable[i]``: whether entry ``i`` counts in N and N_n."""
    beta = cfg.hypergrad_lr
    equal = cfg.hypergrad_scaling == "equal"
    numels = [n if ok else 0 for n, ok in zip(tree.numels, trainable)]
    n_total = sum(numels)

    def node_beta(size: int) -> float:
        if not equal:
            return beta
        return beta * n_total / size if size else 0.0

    def per_node(of_entry: list[int], count: int) -> Tensor:
        sizes = [0] * count
        for e, node in enumerate(of_entry):
            sizes[node] += numels[e]
        return torch.tensor([node_beta(s) for s in sizes], dtype=dtype, device=device)

    betas = {"global": torch.tensor([node_beta(n_total)], dtype=dtype, device=device)}
    block_of = layer_of = None
    if "block" in cfg.levels:
        betas["block"] = per_node(tree.entry_block, len(tree.block_names))
        block_of = torch.tensor(tree.entry_block, dtype=torch.long, device=device)
    if "layer" in cfg.levels:
        betas["layer"] = per_node(tree.entry_layer, len(tree.layer_names))
        layer_of = torch.tensor(tree.entry_layer, dtype=torch.long, device=device)
    unit_dims = [0] * len(tree.entries)
    beta_unit = []
    for g in tree.unit_groups:
        size = sum(numels[m] // g.count for m, _ in g.members) if g.count else 0
        beta_unit.append(node_beta(size))
        for m, dim in g.members:
            unit_dims[m] = dim
    return TreeIndex(block_of, layer_of, betas, beta_unit, node_beta(1),
                     [g.count for g in tree.unit_groups], unit_dims)


# ---------------------------------------------------------------------------------------- one step
@dataclass
class StepTensors:
    """The tensors taking part in one step (those with a gradient), in optimizer order.

    Under sharding (FSDP2) ``params``, ``grads``, ``states`` and ``dirs`` are this rank's local shards.
    ``groups`` lists each param group with the positions of its tensors in these lists and its
    scheduler multiplier ``s = group["lr"] / α₀`` (a Python float, or a 0-d tensor while compiling).
    """

    index: list[int]                    # tree entry of each tensor
    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict]
    dirs: list[Tensor | None]           # previous direction (hyper dtype); u_{t-1} = dir_scale · dir; None: not
                                        # kept, the base rule rebuilds it from its state (BaseRule.previous_directions)
    dir_scales: list[Tensor]            # 0-d
    groups: list[tuple[dict, list[int], object]]
    stored: list[Tensor] | None = None         # the parameters as the optimizer holds them (DTensors under FSDP2)
    offsets: list[Tensor] | None = None        # parameter level: α − α₀ per element
    unit_groups: list[int] | None = None       # unit level: unit group of each tensor
    unit_dims: list[int] | None = None         # unit level: the dimension of each tensor's units
    unit_ranges: list[tuple[int, int]] | None = None  # unit level: the units each tensor holds (local range)
    unit_vectors: dict[int, tuple[Tensor, int]] | None = None  # unit group -> (local α vector, first unit in it)
    unit_stats: dict[int, Tensor] | None = None  # normalized rule: unit group -> local (units, 3) smoothed sums
    stale_dirs: list[dict] | None = None       # states holding a kept direction the rule now rebuilds: dropped after

    @property
    def lr_scales(self) -> list:
        out = [None] * len(self.params)
        for _, members, s in self.groups:
            for m in members:
                out[m] = s
        return out


@dataclass
class PartialSums:
    """Step 1's sums as each rank sees them: ``(T, C)`` (one row per tensor) with the channels Σ g·u and — for
    the normalized rule — Σ g², Σ u²; the γ partials are ``(T,)``."""

    tensor: Tensor                      # Σ h (and the norms)
    unit_rows: list[Tensor] | None = None    # (units held locally, C), per tensor
    gamma_unit: Tensor | None = None    # Σ_units α_unit · Σ h (∂f/∂γ_unit's part from each tensor)
    gamma_param: Tensor | None = None   # Σ (α_param − α₀) ⊙ h


@dataclass
class NodeSums:
    """Step 1's sums over whole nodes (across ranks): what the hyper-update needs."""

    tensor: Tensor                      # (T, C): Σ h (and the norms) per tensor
    units: dict[int, Tensor]            # unit group -> (units, C)
    gamma_unit: Tensor | None = None
    gamma_param: Tensor | None = None
