"""Time ``build_hierarchy`` on a BERT-base-sized model (transformers ``BertConfig()`` defaults) for all five levels.

The model is built from config once (random weights, no download); only ``build_hierarchy`` is timed.
Prints one line, e.g. ``build_hierarchy(bert-base, 5 levels): 0.012 s (median of 5)``.

    python scripts/bench_tree.py
    python scripts/bench_tree.py --repeats 11 --levels global,block,layer
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertModel

from hf_camhd import build_hierarchy
from hf_camhd.hierarchy import LEVELS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--levels", default=",".join(LEVELS))
    p.add_argument("--meta", action="store_true", help="build the model on the meta device (no memory)")
    args = p.parse_args(argv)
    with torch.device("meta" if args.meta else "cpu"):
        model = BertModel(BertConfig())
    levels = tuple(args.levels.split(","))
    build_hierarchy(model, levels)  # warm-up: imports the builders once
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tree = build_hierarchy(model, levels)
        times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in model.parameters())
    print(f"# {n / 1e6:.1f}M parameters, {len(tree.entries)} tensors, "
          + ", ".join(f"{lv} {tree.num_nodes(lv):,}" for lv in tree.levels))
    print(f"build_hierarchy(bert-base, {len(levels)} levels): {statistics.median(times):.3f} s "
          f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
