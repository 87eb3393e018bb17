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

from .builders import HierarchyBuilder, blocks_from_layers, register_builder, repeated_stacks, top_level_blocks

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


def transformers_blocks(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Block of each trainable parameter: its transformer layer, ``stem``, ``head`` or a tower's
    ``stem`` / ``head`` between stacks (module docstring; :func:`~hf_camhd.hierarchy.builders.blocks_from_layers`).
    A model without recognisable transformer layers gets the generic builder's blocks."""
    layers = transformer_layer_paths(model)
    if not layers:
        layers = repeated_stacks(model, names)
        if not layers:
            warnings.warn(
                f"build_hierarchy: found no transformer layers in {type(model).__name__} (no GradientCheckpointingLayer "
                "module, no ModuleList of a class in _no_split_modules, no repeated stack of modules); using the "
                "top-level children as blocks. Pass blocks={'name': [regex, ...]} for a custom grouping", stacklevel=3)
            return top_level_blocks(names)
    return blocks_from_layers(model, names, layers)


TRANSFORMERS_BUILDER = register_builder(HierarchyBuilder(
    name="transformers",
    matches=is_transformers_model,
    blocks=transformers_blocks,
    description="transformers PreTrainedModel: stem / each transformer layer / head (encoder-decoder: both stacks)",
))
