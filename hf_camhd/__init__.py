"""hf_camhd: CAM-HD (combined adaptive multi-level hyper-gradient descent) optimizers for Hugging Face.

    >>> from hf_camhd import CAMHDAdam, build_hierarchy, create_optimizer, list_optimizers
"""

from .hierarchy import LEVELS, LRTree, build_hierarchy
from .optim import CAMHDAdam, CAMHDAdamW, CAMHDOptimizer, CAMHDSGD, create_optimizer, list_optimizers
from .integrations.timm import register_timm_optimizers_lazily as _register_timm_optimizers  # noqa: E402

_register_timm_optimizers()  # timm's create_optimizer_v2(opt="camhdadam" | ...); lazy: timm is not imported here

__version__ = "0.1.0"

__all__ = [
    "CAMHDAdam",
    "CAMHDAdamW",
    "CAMHDOptimizer",
    "CAMHDSGD",
    "LEVELS",
    "LRTree",
    "build_hierarchy",
    "create_optimizer",
    "list_optimizers",
    "__version__",
]
