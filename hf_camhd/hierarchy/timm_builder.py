"""Hierarchy builder for timm models: blocks from the model's own ``group_matcher(coarse=False)``.

timm models declare their structure for layer-wise lr decay: ``model.group_matcher(coarse=False)``
returns regexes for the stem and for each block, and ``timm.models._manipulate.group_with_matcher``
turns them into ordered groups (a name no regex matches goes to the last group, the head; a regex
with the ``(99999,)`` suffix — ViT's final ``norm``, EfficientNet's ``conv_head``/``bn2``, ConvNeXt's
``norm_pre`` — joins the group before it). This builder uses exactly those groups as the ``block``
level and only gives them readable names:

* the group of the ``stem`` regex is ``"stem"``; the group of unmatched names is ``"head"``;
* any other group is named by the text its regex matched, e.g. ``"layer1.0"`` (ResNet),
  ``"blocks.3"`` (ViT), ``"stages.1.blocks.0"`` (ConvNeXt; a stage's downsample shares the group of
  the stage's first block, as timm's matcher says), ``"blocks.6.0"`` (EfficientNet).

So timm ``resnet18`` gives ``["stem", "layer1.0", "layer1.1", ..., "layer4.1", "head"]`` (10 blocks),
``resnet50`` 18, ``vit_tiny_patch16_224`` 14 (stem, 12 blocks, head), ``convnext_atto`` 14,
``efficientnet_b0`` 18.

Choosing levels for a CNN (Jie et al., CAM-HD): the paper's "filter level" is the ``unit`` level —
on a conv layer a unit is one output channel (filter) together with its bias; on a BatchNorm it is one
channel's scale and shift. The paper's two-level CNN setting is ``levels=("global", "unit")``; add
``"layer"`` (each conv / norm / linear) or ``"block"`` (each residual block) in between for deeper trees.

Example::

    >>> import timm
    >>> from hf_camhd import build_hierarchy
    >>> model = timm.create_model("resnet18", pretrained=False)
    >>> tree = build_hierarchy(model, levels=("global", "block", "unit"))
    >>> tree.node_names("block")[:3], tree.num_nodes("block")
    (['stem', 'layer1.0', 'layer1.1'], 10)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import nn

from .builders import HierarchyBuilder, register_builder

__all__ = ["is_timm_model", "timm_blocks"]

_MATCH_PREV_GROUP = (99999,)  # timm.models._manipulate.MATCH_PREV_GROUP: "join the previous group"


def is_timm_model(model: nn.Module) -> bool:
    """True for a model whose class (or a base class) comes from ``timm.models`` and that has a
    ``group_matcher`` method. Never imports timm."""
    if not callable(getattr(model, "group_matcher", None)):
        return False
    return any(c.__module__.startswith("timm.") for c in type(model).__mro__)


def _labeller(matcher: Mapping):
    """``name -> (label, joins_previous_group)`` from a timm matcher dict, mirroring timm's own
    first-match-wins order (``re.match``, anchored at the start of the name)."""
    compiled = []
    for key, spec in matcher.items():
        if spec is None:
            continue
        if isinstance(spec, (tuple, list)):
            compiled += [(key, re.compile(s[0]), s[1]) for s in spec]
        else:
            compiled.append((key, re.compile(spec), None))

    def label(name: str) -> tuple[str, bool]:
        for key, rx, suffix in compiled:
            m = rx.match(name)
            if m:
                prev = suffix is not None and tuple(suffix) == _MATCH_PREV_GROUP
                if key == "stem":
                    return "stem", prev
                text = m.group(0).rstrip(".")
                return (text or key), prev
        return "head", False

    return label


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    out = []
    for comps in zip(*parts):
        if len(set(comps)) != 1:
            break
        out.append(comps[0])
    return ".".join(out)


def timm_blocks(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Block of each parameter from ``model.group_matcher(coarse=False)`` through timm's own
    ``group_with_matcher``; groups named as described in the module docstring."""
    try:
        from timm.models._manipulate import group_with_matcher
    except ImportError as err:  # pragma: no cover - only without timm
        raise ImportError("hf_camhd's timm hierarchy builder needs timm: pip install timm") from err
    matcher = model.group_matcher(coarse=False)
    groups = group_with_matcher(((n, n) for n in names), matcher)
    label = _labeller(matcher) if isinstance(matcher, Mapping) else None
    out: dict[str, str] = {}
    used: set[str] = set()
    last = max(groups) if groups else -1
    for gid in sorted(groups):
        members = groups[gid]
        if label is not None:
            labels = [label(n) for n in members]
            own = [lb for lb, prev in labels if not prev] or [lb for lb, _ in labels]
            # note: a group can hold two labels (ConvNeXt: stages.1.downsample + stages.1.blocks.0);
            # it takes the one with the most tensors, first seen on ties
            counts: dict[str, int] = {}
            for lb in own:
                counts[lb] = counts.get(lb, 0) + 1
            name = max(counts, key=lambda k: (counts[k], -own.index(k)))
        else:  # a callable matcher: name the group by its members' common module path
            name = "stem" if gid == 0 else ("head" if gid == last and gid > 0 else "")
            name = name or _common_prefix(members) or f"group{gid}"
        if name in used:
            name = f"{name}#{gid}"
        used.add(name)
        for n in members:
            out[n] = name
    return out


TIMM_BUILDER = register_builder(HierarchyBuilder(
    name="timm",
    matches=is_timm_model,
    blocks=timm_blocks,
    description="timm models: stem / each block of model.group_matcher(coarse=False) / head",
))
