"""Hierarchy builder for the models of :mod:`hf_camhd.models` (LeNet-5, MLP): one block per stage.

Each conv or linear stage of :class:`~hf_camhd.models.LeNet5` (``conv1``, ``conv2``, ``fc1``, ``fc2``,
``fc3``) and of :class:`~hf_camhd.models.MLP` (``layers.0``, ..., ``head``) is one block, as listed by
the model's ``block_names()``; activations and pools hold no parameters. In these nets a block is
one layer, so ``block`` and ``layer`` give the same nodes — use either.

Choosing levels (Jie et al., CAM-HD):

* MLP: the paper's three-level setting is ``levels=("global", "layer", "parameter")`` (γ initialised
  to 0.4, 0.3, 0.3 = global, layer, parameter); its two-level setting ``("global", "layer")``.
* LeNet-5: the paper's "filter level" is the ``unit`` level — a conv unit is one output channel
  (filter) with its bias, a linear unit one output row with its bias — so the two-level CNN setting is
  ``("global", "unit")`` (γ = 0.8, 0.2); ``("global", "layer", "unit")`` adds the layer level.

Example::

    >>> from hf_camhd import build_hierarchy
    >>> from hf_camhd.models import LeNet5
    >>> tree = build_hierarchy(LeNet5(), levels=("global", "block", "unit"))
    >>> tree.node_names("block")
    ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
    >>> tree.num_nodes("unit")  # 6 + 16 filters, 120 + 84 + 10 neurons
    236
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn

from .builders import HierarchyBuilder, register_builder, top_level_blocks

__all__ = ["is_hf_camhd_model", "stage_blocks"]


def is_hf_camhd_model(model: nn.Module) -> bool:
    """True for an :class:`~hf_camhd.models.LeNet5` or :class:`~hf_camhd.models.MLP` (or a subclass)."""
    models = sys.modules.get("hf_camhd.models")  # not imported yet: the model cannot be one of ours
    if models is None:
        return False
    return isinstance(model, (models.LeNet5, models.MLP))


def stage_blocks(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Block = the stage of ``model.block_names()`` that holds the parameter; a parameter outside
    every stage (a subclass's extra tensor) falls back to its top-level child."""
    stages = list(model.block_names())
    fallback = top_level_blocks(names)
    out = {}
    for n in names:
        out[n] = next((s for s in stages if n.startswith(s + ".")), fallback[n])
    return out


MODELS_BUILDER = register_builder(HierarchyBuilder(
    name="hf_camhd.models",
    matches=is_hf_camhd_model,
    blocks=stage_blocks,
    description="LeNet5 / MLP of hf_camhd.models: one block per conv or linear stage",
))
