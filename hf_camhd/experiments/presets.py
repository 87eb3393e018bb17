"""Task presets for ``hf-camhd compare``: the paper's Table 1 settings (and our small offline default), per task.

A preset fixes the model, the dataset and every hyper-parameter the comparison arms read
(:mod:`hf_camhd.experiments.arms`). Values come from the paper's Table 1 and text (docs/algorithm.md §6); where the
paper is silent the choice is ours and is marked ``# ours`` below and in the README.

| task                   | model          | dataset       | batch | epochs | Adam lr | SGD lr | β Adam / SGD | δ     | r     |
|------------------------|----------------|---------------|-------|--------|---------|--------|--------------|-------|-------|
| mlp-digits (default)   | MLP [100, 100] | digits        | 64    | 20     | 1e-3    | 0.1    | 1e-7 / 1e-3  | 0.01  | 0     |
| mlp-mnist              | MLP [100]x3    | mnist         | 128   | 30     | 1e-3    | 0.1    | 1e-7 / 1e-3  | 0.01  | 0     |
| mlp-fashion-mnist      | MLP [100]x3    | fashion_mnist | 128   | 10     | 1e-3    | 0.1    | 1e-7 / 1e-3  | 0.01  | 0     |
| lenet5-mnist           | LeNet-5        | mnist         | 256   | 30     | 1e-3    | 0.1    | 1e-8 / 1e-3  | 0.03  | 0.002 |
| lenet5-fashion-mnist   | LeNet-5        | fashion_mnist | 256   | 10     | 1e-3    | 0.1    | 1e-8 / 1e-3  | 0.03  | 0.002 |
| lenet5-cifar10         | LeNet-5        | cifar10       | 256   | 30     | 1e-3    | 0.1    | 1e-8 / 1e-3  | 0.03  | 0.002 |
| lenet5-svhn            | LeNet-5        | svhn          | 128   | 30     | 1e-3    | 0.1    | 1e-8 / 1e-3  | 0.03  | 0.002 |
| resnet18-cifar10       | ResNet-18      | cifar10       | 256   | 200    | 1e-3    | 0.1    | 1e-8 / 1e-6  | 0.001 | 0.001 |
| resnet34-cifar10       | ResNet-34      | cifar10       | 256   | 200    | 1e-3    | 0.1    | 1e-8 / 1e-6  | 0.001 | 0.001 |

(β: hyper-gradient lr, δ: γ's lr, r: decay rate of τ(t).) The ResNets use weight decay 1e-4 for
the Adam family (the paper's) and 5e-4 for SGD (ours), and multiply the SGD family's lr by 0.1 after
epoch 150. The SGD lr of the MLP / LeNet-5 tasks and the LeNet-5 epoch counts are ours (Table 1 is
silent); the Fashion-MNIST tasks reuse the MNIST settings for the 10 epochs of our committed results.

CAM-HD trees: the MLPs use 2 levels ``global, layer`` with γ = (0.5, 0.5) and 3 levels
``global, layer, parameter`` with γ = (0.4, 0.3, 0.3); the CNNs use 2 levels ``global, unit`` (the
paper's "filter" level) with γ = (0.8, 0.2) and, for a 3-level tree, ``global, layer, parameter`` with
(0.4, 0.3, 0.3). γ is listed in ``levels`` order (global first), the reverse of the paper's γ₁, γ₂.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["TaskPreset", "TASKS", "DEFAULT_TASK", "get_task", "list_tasks", "SWEEP_GAMMAS", "SWEEP_HYPERGRAD_LRS",
           "sweep_hypergrad_lrs"]

#: γ_global values of the paper's Figure 1 sweep (two levels, fixed γ).
SWEEP_GAMMAS: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

#: β grids of ``--sweep-hypergrad-lr``, per (rule, base family), one value per decade. The additive grids
#: span the paper's values (Table 1: Adam 1e-7 MLP / 1e-8 LeNet-5 and ResNets; SGD 1e-3 MLP and LeNet-5 /
#: 1e-6 ResNets) two decades below and up to where the additive rule breaks down (on the digits MLP: Adam at
#: 1e-3 – 1e-2, SGD-N at 1e-1; a bigger model breaks down at a smaller β, since its node sums grow with its
#: size); the normalized rule's β is dimensionless (a rate moves by at most the fraction β per step), so one
#: grid serves both bases: four decades up to 0.1 (10 % per step). It stops there because the rule is defined
#: for β < 1 only (at β = 1 one step can set a rate to 0, where a multiplicative rule leaves it for good);
#: 1e-5 is about the base optimizer (a rate moves by at most 1e-5 of itself per step).
SWEEP_HYPERGRAD_LRS: Mapping[tuple[str, str], tuple[float, ...]] = MappingProxyType({
    ("additive", "adam"): (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3),
    ("additive", "sgd"): (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    ("normalized", "adam"): (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    ("normalized", "sgd"): (1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
})


def sweep_hypergrad_lrs(rule: str, family: str) -> tuple[float, ...]:
    """The default β grid of ``--sweep-hypergrad-lr`` for ``rule`` on a ``family`` (``adam`` / ``sgd``) base."""
    return SWEEP_HYPERGRAD_LRS[(rule, family)]


@dataclass(frozen=True)
class TaskPreset:
    """Everything a comparison task fixes: model, data and the hyper-parameters of every arm.

    Attributes:
        name: the ``--task`` name.
        model: ``mlp``, ``lenet5``, ``resnet18`` or ``resnet34`` (see :mod:`hf_camhd.experiments.models`).
        dataset: a name of :func:`hf_camhd.data.load_image_dataset`.
        model_kwargs: extra model arguments (``hidden_sizes`` of the MLP).
        epochs, batch_size: training length and mini-batch size (Table 1).
        adam_lr: α₀ of every Adam-family arm (Adam, AdamW, RAdam, AdaBound, Adam-HD, Adam-CAM-HD).
        sgd_lr, momentum: α₀ and momentum of every SGD-family arm (SGD, SGDN, SGD-HD, SGD(N)-CAM-HD).
        adam_hypergrad_lr, sgd_hypergrad_lr: β of the HD / CAM-HD arms (Table 1 "Hyper-grad lr").
        gamma_lr: δ, the combination-weight rate of the CAM-HD arms (Table 1 "CAM-HD-lr").
        decay_rate: r of τ(t) = exp(−r t) for the CAM-HD arms (t in iterations; 0 = off).
        levels_2, gamma_2: the two-level CAM-HD tree and its γ (``levels`` order, global first).
        levels_3, gamma_3: the three-level tree and its γ.
        weight_decay: L2 weight decay of the Adam-family arms (L4 has none).
        adamw_weight_decay: decoupled weight decay of the AdamW arms (AdamW's usual 1e-2; ours).
        sgd_weight_decay: weight decay of the SGD-family arms.
        sgd_milestones: epochs after which the SGD-family arms' lr is multiplied by ``sgd_lr_factor``
            (a :class:`torch.optim.lr_scheduler.MultiStepLR`; CAM-HD treats it as a multiplier).
        optimizers: the arms compared when ``--optimizers`` is not given.
        resnet_cifar_stem: for the ResNets: 3x3 stride-1 stem without max-pool (32x32 inputs).
        description: one line for ``--help`` and results.md.
    """

    name: str
    model: str
    dataset: str
    epochs: int
    batch_size: int
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    adam_lr: float = 1e-3
    sgd_lr: float = 0.1
    momentum: float = 0.9
    adam_hypergrad_lr: float = 1e-8
    sgd_hypergrad_lr: float = 1e-3
    gamma_lr: float = 0.03
    decay_rate: float = 0.0
    levels_2: tuple[str, ...] = ("global", "unit")
    gamma_2: tuple[float, ...] = (0.8, 0.2)
    levels_3: tuple[str, ...] = ("global", "layer", "parameter")
    gamma_3: tuple[float, ...] = (0.4, 0.3, 0.3)
    weight_decay: float = 0.0
    adamw_weight_decay: float = 1e-2
    sgd_weight_decay: float = 0.0
    sgd_milestones: tuple[int, ...] = ()
    sgd_lr_factor: float = 0.1
    optimizers: tuple[str, ...] = ("adam", "adam-hd", "adam-camhd")
    resnet_cifar_stem: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_kwargs", MappingProxyType(dict(self.model_kwargs)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (tuples become lists)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model_kwargs"] = dict(self.model_kwargs)
        return _jsonable(out)

    def with_overrides(self, **changes: Any) -> "TaskPreset":
        """A copy with some fields changed (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_MLP_TREES = dict(levels_2=("global", "layer"), gamma_2=(0.5, 0.5),
                  levels_3=("global", "layer", "parameter"), gamma_3=(0.4, 0.3, 0.3))
# Table 1, "MLP 3" row (batch 128, Adam lr 1e-3, β 1e-7, δ 0.01); the MLP of §3.2 / Figure 1: [100, 100, 100]
_MLP = dict(model="mlp", model_kwargs={"hidden_sizes": (100, 100, 100)}, batch_size=128, adam_lr=1e-3,
            adam_hypergrad_lr=1e-7, sgd_hypergrad_lr=1e-3, gamma_lr=0.01, decay_rate=0.0,
            # ours: Table 1 gives no SGD lr for the MLP or LeNet-5. 0.1 (the ResNets' SGDN lr and the
            # baselines' default) beat 0.01 for SGD, SGDN and SGD-HD in a 3-epoch Fashion-MNIST check, and
            # SGDN-CAM-HD (β = 1e-3) diverged on LeNet-5 at 0.01 but not at 0.1
            sgd_lr=0.1,
            optimizers=("adam", "adam-hd", "adam-camhd-3level", "adam-camhd-2level"), **_MLP_TREES)
# Table 1 LeNet-5 rows + §3.4: two levels global + filter, γ = (0.8, 0.2), r = 0.002
_LENET = dict(model="lenet5", batch_size=256, adam_lr=1e-3, adam_hypergrad_lr=1e-8, sgd_hypergrad_lr=1e-3,
              gamma_lr=0.03, decay_rate=0.002, levels_2=("global", "unit"), gamma_2=(0.8, 0.2),
              sgd_lr=0.1,  # ours: see _MLP
              optimizers=("adam", "adam-hd", "adam-l4", "adabound", "radam", "adam-camhd"))
# Table 1 ResNet rows + §3.5: SGDN lr 0.1, momentum 0.9, ×0.1 after epoch 150; Adam-family weight decay 1e-4
_RESNET = dict(dataset="cifar10", epochs=200, batch_size=256, adam_lr=1e-3, sgd_lr=0.1, momentum=0.9,
               adam_hypergrad_lr=1e-8, sgd_hypergrad_lr=1e-6, gamma_lr=0.001, decay_rate=0.001,
               levels_2=("global", "unit"), gamma_2=(0.8, 0.2), weight_decay=1e-4,
               sgd_weight_decay=5e-4,  # ours: the paper does not give SGDN's; 5e-4 is the usual CIFAR ResNet value
               sgd_milestones=(150,), sgd_lr_factor=0.1,
               optimizers=("adam", "adam-hd", "adam-l4", "adabound", "radam", "adam-camhd", "sgdn", "sgdn-camhd"))

TASKS: Mapping[str, TaskPreset] = MappingProxyType({t.name: t for t in (
    TaskPreset(name="mlp-digits", dataset="digits", epochs=20,
               **{**_MLP, "model_kwargs": {"hidden_sizes": (100, 100)}, "batch_size": 64,
                  "optimizers": ("adam", "adam-hd", "adam-camhd", "adam-camhd-normalized")},
               description="the small offline default: MLP [100, 100] on scikit-learn's 8x8 digits (1,438 train "
                           "/ 359 test), MLP settings of Table 1"),
    TaskPreset(name="mlp-mnist", dataset="mnist", epochs=30, **_MLP,
               description="MLP [100, 100, 100] on MNIST (paper §3.2–3.3, Table 1 'MLP 3' row)"),
    TaskPreset(name="mlp-fashion-mnist", dataset="fashion_mnist", epochs=10, **_MLP,
               description="mlp-mnist's settings on Fashion-MNIST (the paper did not run Fashion-MNIST)"),
    # ours: the LeNet-5 runs' length is not stated in the paper; 30 epochs as for the MLP (§3.3)
    TaskPreset(name="lenet5-mnist", dataset="mnist", epochs=30, **_LENET,
               description="LeNet-5 on MNIST (paper §3.4, Table 2)"),
    TaskPreset(name="lenet5-fashion-mnist", dataset="fashion_mnist", epochs=10, **_LENET,
               description="lenet5-mnist's settings on Fashion-MNIST (the paper did not run Fashion-MNIST)"),
    TaskPreset(name="lenet5-cifar10", dataset="cifar10", epochs=30, **_LENET,
               description="LeNet-5 on CIFAR-10 (paper §3.4, Table 2)"),
    TaskPreset(name="lenet5-svhn", dataset="svhn", epochs=30, **{**_LENET, "batch_size": 128},
               description="LeNet-5 on SVHN (paper §3.4, Table 2; batch 128 per Table 1)"),
    TaskPreset(name="resnet18-cifar10", model="resnet18", **_RESNET,
               description="timm ResNet-18 (CIFAR stem) on CIFAR-10, 200 epochs (paper §3.5, Table 3)"),
    TaskPreset(name="resnet34-cifar10", model="resnet34", **_RESNET,
               description="timm ResNet-34 (CIFAR stem) on CIFAR-10, 200 epochs (paper §3.5, Table 3)"),
)})
"""The ``--task`` presets by name."""

DEFAULT_TASK = "mlp-digits"


def list_tasks() -> list[str]:
    """The ``--task`` names."""
    return list(TASKS)


def get_task(name: str) -> TaskPreset:
    """The preset ``name`` (case-insensitive; ``_`` accepted for ``-``)."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in TASKS:
        raise ValueError(f"Unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[key]
