"""hf_camhd: CAM-HD (combined adaptive multi-level hyper-gradient descent) optimizers for Hugging Face.

The optimizers and the learning-rate trees need torch alone; the Hugging Face integrations, models, data,
metrics and experiments are behind the ``hf`` / ``experiments`` extras (``pip install 'hf_camhd[all]'``).

    >>> import torch
    >>> from hf_camhd import CAMHDAdam
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> opt = CAMHDAdam(model, lr=1e-3, levels=("global", "layer"))
    >>> opt.levels, opt.alpha("layer").shape
    (('global', 'layer'), torch.Size([2]))
"""

from .hierarchy import LEVELS, LRTree, build_hierarchy
from .optim import (CAMHDAdam, CAMHDAdamW, CAMHDOptimizer, CAMHDScheduleFreeAdamW, CAMHDSGD, create_optimizer,
                    list_optimizers)
from .integrations import register_timm_optimizers_lazily as _register_timm_optimizers  # noqa: E402

_register_timm_optimizers()  # timm's create_optimizer_v2(opt="camhdadam" | ...); lazy: timm is not imported here

__version__ = "0.1.0"

__all__ = [
    "CAMHDAdam",
    "CAMHDAdamW",
    "CAMHDOptimizer",
    "CAMHDSGD",
    "CAMHDScheduleFreeAdamW",
    "LEVELS",
    "LRTree",
    "build_hierarchy",
    "create_optimizer",
    "list_optimizers",
    "__version__",
]
