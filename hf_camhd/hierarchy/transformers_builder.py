"""Hierarchy builder for Hugging Face transformers models: stem / each transformer layer / head.

Blocks of a ``transformers.PreTrainedModel``:

* **each transformer layer** — every outermost module whose class subclasses
  ``transformers.modeling_layers.GradientCheckpointingLayer`` (the layers of ``bert.encoder.layer``,
  ``transformer.h``, ``model.layers``, ``vit.layers``, T5's ``encoder.block`` / ``decoder.block``), named
  by its path (``"bert.encoder.layer.3"``). Models whose layers do not subclass it fall back to the
  homogeneous ``nn.ModuleList`` s of a class named in ``model._no_split_modules``.
* **"stem"** — every parameter registered before the first layer (embeddings, patch / position
  embeddings, T5's ``shared``).
* **"head"** — every parameter registered after the last layer (final norm, pooler, classifier,
  an untied LM head).
* **between two stacks** (encoder-decoder and multi-tower models) a parameter belongs to the
  *tower* of the stack it sits under (the stack's path down to the first component where the stacks'
  paths differ: ``encoder`` / ``decoder`` for T5, ``model.encoder`` / ``model.decoder`` for BART,
  ``text_model`` / ``vision_model`` for CLIP): the trailing parameters of the stack before it go to
  ``"<tower>.head"`` (T5's ``encoder.final_layer_norm`` → ``"encoder.head"``), the leading parameters
  of the stack after it to ``"<tower>.stem"`` (BART's ``model.decoder.embed_positions`` →
  ``"model.decoder.stem"``); one under neither tower goes to the next stack's stem.
* **embeddings registered after their layers** (BART's ``layernorm_embedding``: a module whose name
  contains ``embedding`` or starts with ``embed_tokens`` / ``embed_positions``) go to their tower's
  stem, not to a head — ``"stem"`` for the first stack, ``"<tower>.stem"`` for a later one.

Positions are the model's full ``named_parameters()`` order (registration order, not forward order),
so freezing a tensor never moves another one to a different block.

So T5 (``T5ForConditionalGeneration``) gives ``["stem", "encoder.block.0", ..., "encoder.head",
"decoder.block.0", ..., "head"]``: ``stem`` is ``shared`` (the input embedding of both stacks, and
the LM head when tied), ``encoder.head`` the encoder's final layer norm, ``head`` the decoder's
final layer norm (plus ``lm_head`` when untied).

Tied weights appear once (``named_parameters()`` yields a shared tensor under its first name: GPT-2's
``lm_head.weight`` is ``transformer.wte.weight``, in the stem). Units follow each module's real output
dimension: GPT-2's ``Conv1D`` stores its weight as [in, out], so its units run along dim 1
(:func:`hf_camhd.hierarchy.builders.module_unit_dims`).

Choosing levels: ``("global", "block")`` gives one rate per transformer layer (a learned version of
layer-wise lr decay); ``("global", "block", "layer")`` adds one per linear / norm / embedding; the
``unit`` level (one output row of a linear with its bias, one embedding row) and the ``parameter``
level grow with the model width and are rarely worth their memory on large models.

Example::

    >>> from transformers import BertConfig, BertModel
    >>> from hf_camhd import build_hierarchy
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=37, vocab_size=99))
    >>> build_hierarchy(model, levels=("global", "block")).node_names("block")
    ['stem', 'encoder.layer.0', 'encoder.layer.1', 'head']
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

from torch import nn

from .builders import HierarchyBuilder, generic_blocks, register_builder

__all__ = ["is_transformers_model", "transformer_layer_paths", "transformers_blocks"]


def is_transformers_model(model: nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel``. Never imports transformers."""
    tf = sys.modules.get("transformers")
    if tf is None:  # not imported: the model cannot be a PreTrainedModel
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _outermost(paths: list[str]) -> list[str]:
    """Drop every path that lies inside another one of ``paths`` (input in pre-order)."""
    kept: list[str] = []
    kept_set: set[str] = set()
    for p in paths:
        parts = p.split(".")
        if any(".".join(parts[:k]) in kept_set for k in range(1, len(parts))):
            continue
        kept.append(p)
        kept_set.add(p)
    return kept


def transformer_layer_paths(model: nn.Module) -> list[str]:
    """Paths of the model's transformer layers, in module order (see the module docstring)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: no common layer base class
        GradientCheckpointingLayer = None
    if GradientCheckpointingLayer is not None:
        found = [n for n, m in model.named_modules() if n and isinstance(m, GradientCheckpointingLayer)]
        if found:
            return _outermost(found)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    found = []
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1 \
                and type(m[0]).__name__ in no_split:
            found += [f"{n}.{i}" if n else str(i) for i in range(len(m))]
    return _outermost(found)


def _layer_of(name: str, layers: set[str]) -> str | None:
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:k])
        if p in layers:
            return p
    return None


def _is_embedding(name: str) -> bool:
    """Whether a tensor belongs to an embedding module (``embeddings``, ``embed_tokens``,
    ``embed_positions``, ``layernorm_embedding``; not GPT-NeoX's ``embed_out`` LM head)."""
    return any("embedding" in c.lower() or c.startswith(("embed_tokens", "embed_positions"))
               for c in name.split(".")[:-1])


def _towers(stacks: list[str]) -> dict[str, str]:
    """Each stack path's tower: the common prefix of all stack paths plus the stack's next component."""
    split = [s.split(".") for s in stacks]
    common = 0
    while all(len(p) > common for p in split) and len({p[common] for p in split}) == 1:
        common += 1
    return {s: ".".join(p[:common + 1]) for s, p in zip(stacks, split)}


def transformers_blocks(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Block of each trainable parameter: its transformer layer, ``stem``, ``head`` or a tower's
    ``stem`` / ``head`` between stacks (module docstring)."""
    layers = transformer_layer_paths(model)
    if not layers:
        warnings.warn(
            f"build_hierarchy: found no transformer layers in {type(model).__name__} (no GradientCheckpointingLayer "
            "module, no ModuleList of a class in _no_split_modules); using the top-level children as blocks. "
            "Pass blocks={'name': [regex, ...]} for a custom grouping", stacklevel=3)
        return generic_blocks(model, names)
    layer_set = set(layers)
    all_names = [n for n, _ in model.named_parameters()]  # positions independent of freezing
    pos = {n: i for i, n in enumerate(all_names)}
    layer_of = {n: _layer_of(n, layer_set) for n in all_names}
    stacks: list[str] = []  # the containers of the layers (e.g. "encoder.block"), in order
    for lp in layers:
        parent = lp.rsplit(".", 1)[0] if "." in lp else ""
        if parent not in stacks:
            stacks.append(parent)
    stack_of_layer = {lp: (lp.rsplit(".", 1)[0] if "." in lp else "") for lp in layers}
    # first / last parameter position of each stack
    span: dict[str, list[int]] = {}
    for n in all_names:
        lp = layer_of[n]
        if lp is not None:
            s = span.setdefault(stack_of_layer[lp], [pos[n], pos[n]])
            s[0], s[1] = min(s[0], pos[n]), max(s[1], pos[n])
    if not span:  # the layers hold no parameters at all
        return generic_blocks(model, names)
    first = min(s[0] for s in span.values())
    last = max(s[1] for s in span.values())
    towers = _towers([s for s in stacks if s in span]) if len(span) > 1 else {}
    ordered = sorted(span, key=lambda s: span[s][0])

    first_tower = towers.get(ordered[0]) if towers else None

    def stem_of(n: str) -> str:
        """The stem on the side of ``n``'s tower (for an embedding registered after its layers)."""
        tower = next((t for t in dict.fromkeys(towers.values()) if n.startswith(t + ".")), None)
        return "stem" if tower is None or tower == first_tower else f"{tower}.stem"

    out: dict[str, str] = {}
    for n in names:
        lp = layer_of[n]
        if lp is not None:
            out[n] = lp
            continue
        p = pos[n]
        if p < first:
            block = "stem"
        elif p > last:
            block = stem_of(n) if _is_embedding(n) else "head"
        elif any(a < p < b for a, b in span.values()) or not towers:
            # among one stack's layers (layers not in one list): the layer before
            block = next((layer_of[m] for m in reversed(all_names[:p]) if layer_of[m] is not None), "stem")
        else:
            # note: between two stacks; the tower the tensor sits under decides (module docstring)
            prev_stack = max((s for s in ordered if span[s][1] < p), key=lambda s: span[s][1])
            next_stack = min((s for s in ordered if span[s][0] > p), key=lambda s: span[s][0])
            if n.startswith(towers[prev_stack] + "."):
                block = stem_of(n) if _is_embedding(n) else f"{towers[prev_stack]}.head"
            else:  # under the next stack's tower, or under none
                block = f"{towers[next_stack]}.stem"
        out[n] = block
    return out


TRANSFORMERS_BUILDER = register_builder(HierarchyBuilder(
    name="transformers",
    matches=is_transformers_model,
    blocks=transformers_blocks,
    description="transformers PreTrainedModel: stem / each transformer layer / head (encoder-decoder: both stacks)",
))
