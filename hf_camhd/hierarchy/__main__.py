"""``python -m hf_camhd.hierarchy MODEL``: print the learning-rate tree of a model.

MODEL is one of

* a timm model name (``resnet18``, ``vit_tiny_patch16_224``, ...), built with ``pretrained=False``;
* a transformers configuration from the built-in list below (built locally from a config object,
  nothing is downloaded): ``bert-tiny``, ``bert-base``, ``gpt2-tiny``, ``gpt2``, ``llama-tiny``,
  ``t5-tiny``, ``t5-small``, ``vit-tiny``, ``vit-base``;
* ``lenet5`` or ``mlp`` (:mod:`hf_camhd.models` with their default arguments).

Models are built on the ``meta`` device when possible (only names and shapes are needed), so even
``gpt2`` prints in about a second.

Examples::

    python -m hf_camhd.hierarchy resnet18 --levels global,block,layer,unit --nodes block
    python -m hf_camhd.hierarchy t5-small --nodes block
    python -m hf_camhd.hierarchy lenet5 --levels global,unit --nodes unit --limit 10

Choosing levels: the paper's two-level CNN setting (its "filter level") is ``global,unit`` — a conv
unit is one filter with its bias; its three-level MLP setting is ``global,layer,parameter``;
``global,block`` gives one learned rate per residual block / transformer layer.

``main(argv)`` returns the exit status, so another CLI can mount it (``hf-camhd tree``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .builders import build_hierarchy
from .tree import LEVELS, LRTree

__all__ = ["TRANSFORMERS_MODELS", "build_named_model", "main", "make_parser", "model_names"]


def _tf(config_cls: str, model_cls: str, **config) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers
        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg)
    make.__doc__ = f"{model_cls}({config_cls}({', '.join(f'{k}={v!r}' for k, v in config.items())}))"
    return make


_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)

TRANSFORMERS_MODELS: dict[str, Callable[[], nn.Module]] = {
    "bert-tiny": _tf("BertConfig", "BertForSequenceClassification", vocab_size=1000, **_TINY),
    "bert-base": _tf("BertConfig", "BertForSequenceClassification"),
    "gpt2-tiny": _tf("GPT2Config", "GPT2LMHeadModel", n_embd=64, n_layer=2, n_head=2, n_positions=128,
                     vocab_size=1000),
    "gpt2": _tf("GPT2Config", "GPT2LMHeadModel"),
    "llama-tiny": _tf("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=1, vocab_size=1000, **_TINY),
    "t5-tiny": _tf("T5Config", "T5ForConditionalGeneration", d_model=64, d_kv=32, d_ff=128, num_layers=2,
                   num_heads=2, vocab_size=1000),
    "t5-small": _tf("T5Config", "T5ForConditionalGeneration"),
    "vit-tiny": _tf("ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, num_labels=10,
                    **_TINY),
    "vit-base": _tf("ViTConfig", "ViTForImageClassification", num_labels=1000),
}
"""The built-in transformers models: name -> a function building it from a config (no download)."""


def _own_model(name: str) -> nn.Module:
    from hf_camhd.models import MLP, LeNet5
    return LeNet5() if name == "lenet5" else MLP()


def model_names() -> list[str]:
    """The non-timm names :func:`build_named_model` knows."""
    return ["lenet5", "mlp", *TRANSFORMERS_MODELS]


def build_named_model(name: str, *, device: str | torch.device = "meta") -> nn.Module:
    """Build the model called ``name`` (see the module docstring) with random weights.

    ``device="meta"`` allocates no memory (enough for a tree); a model that cannot be built there is
    built on the CPU instead.
    """
    if name in ("lenet5", "mlp"):
        make = lambda: _own_model(name)  # noqa: E731
    elif name in TRANSFORMERS_MODELS:
        make = TRANSFORMERS_MODELS[name]
    else:
        try:
            import timm
        except ImportError:
            timm = None
        if timm is None or not timm.is_model(name):
            hint = "" if timm is not None else " (timm is not installed: pip install 'hf_camhd[hf]')"
            raise ValueError(f"Unknown model {name!r}: expected a timm model name{hint}, "
                             f"or one of {', '.join(model_names())}")
        make = lambda: timm.create_model(name, pretrained=False)  # noqa: E731
    if str(device) == "meta":
        try:
            with torch.device("meta"):
                return make()
        except Exception:  # noqa: BLE001 - some constructors compute on their weights; fall back to CPU
            pass
    with torch.device(device if str(device) != "meta" else "cpu"):
        return make()


def _node_table(tree: LRTree, level: str, limit: int) -> str:
    names = tree.node_names(level)
    sizes = None if level == "parameter" else tree.node_sizes(level)
    n = len(names)
    shown = n if limit <= 0 else min(n, limit)
    rows = [(names[i], f"{1 if sizes is None else sizes[i]:,}") for i in range(shown)]
    w0 = max([len(level)] + [len(r[0]) for r in rows])
    w1 = max([len("parameters")] + [len(r[1]) for r in rows])
    out = [f"{level} nodes ({n:,})", f"| {level.ljust(w0)} | {'parameters'.rjust(w1)} |",
           f"|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|"]
    out += [f"| {a.ljust(w0)} | {b.rjust(w1)} |" for a, b in rows]
    if shown < n:
        out.append(f"... {n - shown:,} more (--limit 0 shows all)")
    return "\n".join(out)


def make_parser(prog: str = "python -m hf_camhd.hierarchy") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Print the CAM-HD learning-rate tree of a model.",
                                epilog="Built-in non-timm models: " + ", ".join(model_names()))
    p.add_argument("model", help="a timm model name, a built-in transformers config name, lenet5 or mlp")
    p.add_argument("--levels", default=",".join(LEVELS),
                   help="comma-separated ordered subset of %(default)s (global first)")
    p.add_argument("--nodes", metavar="LEVEL", choices=LEVELS, help="also list the nodes of LEVEL with their sizes")
    p.add_argument("--limit", type=int, default=200, help="list at most this many nodes (0: all; default %(default)s)")
    p.add_argument("--builder", default=None, help="force a hierarchy builder (default: detect)")
    p.add_argument("--save", metavar="PATH", help="also write the tree as JSON to PATH")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit status. ``prog`` names the
    command in help and errors (``"hf-camhd tree"`` when mounted as a subcommand)."""
    parser = make_parser(prog) if prog else make_parser()
    args = parser.parse_args(argv)
    try:
        model = build_named_model(args.model)
        tree = build_hierarchy(model, args.levels, builder=args.builder)
        if args.nodes is not None and args.nodes not in tree.levels:
            raise ValueError(f"--nodes {args.nodes}: the level is not in --levels {','.join(tree.levels)}")
    except (ValueError, ImportError) as err:  # ImportError: the model needs an extra (the message names it)
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"{args.model} ({type(model).__name__})")
    print(tree)
    if args.nodes is not None:
        print()
        print(_node_table(tree, args.nodes, args.limit))
    if args.save:
        try:
            tree.save(args.save)
        except OSError as err:
            parser.exit(2, f"{parser.prog}: error: --save {args.save}: cannot write the tree there "
                           f"({err.strerror or err}); pass a file path in a writable folder\n")
        print(f"\nwrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
