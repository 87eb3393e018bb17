"""CAM-HD optimizers, their base direction rules and the optimizer registry."""

from .base_rules import AdamRule, BaseRule, Directions, ScheduleFreeRule, SGDRule
from .camhd import CAMHDAdam, CAMHDAdamW, CAMHDOptimizer, CAMHDSGD
from .schedule_free import CAMHDScheduleFreeAdamW

__all__ = ["AdamRule", "BaseRule", "CAMHDAdam", "CAMHDAdamW", "CAMHDOptimizer", "CAMHDSGD", "CAMHDScheduleFreeAdamW",
           "Directions", "SGDRule", "ScheduleFreeRule"]

from .registry import OptimInfo, create_optimizer, get_optimizer_info, list_optimizers  # noqa: E402

__all__ += ["OptimInfo", "create_optimizer", "get_optimizer_info", "list_optimizers"]
