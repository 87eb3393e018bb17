"""Time ``optimizer.step()`` of CAM-HD against torch's foreach Adam / SGD in the same run.

Parameter sets: the shapes of a timm ResNet-18 and of a BERT-base-sized transformer (both built from
config, no weights). Trees: global; global+layer; global+layer+unit; global+layer+parameter. Steps are
interleaved round-robin across optimizers (so machine noise hits all of them alike) and each ratio is
median(step time) / median(step time of the torch baseline) over ``--steps`` steps after ``--warmup``.
State bytes count every tensor the optimizer holds (per-parameter state and group tensors) divided by
the parameter bytes.

    python scripts/bench_step.py                 # both models, markdown table
    python scripts/bench_step.py --models resnet18 --steps 30
    python scripts/bench_step.py --allocator no-trim   # glibc keeps freed memory: no page-fault cost

Allocator note: torch.optim.Adam allocates one parameter-sized temporary per step (CAM-HD allocates
none); with glibc's default settings that memory is returned to the OS and page-faulted back every
step, which can dominate Adam's step on CPU. ``--allocator no-trim`` re-runs the script with
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set so allocations are recycled: the
conservative comparison of the arithmetic alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import statistics
import sys
import time

import torch

from hf_camhd import CAMHDAdam, CAMHDSGD, build_hierarchy

TREES = {
    "global": ("global",),
    "global+layer": ("global", "layer"),
    "global+layer+unit": ("global", "layer", "unit"),
    "global+layer+parameter": ("global", "layer", "parameter"),
}
FOREACH_TOO = ("global+layer", "global+layer+parameter")


def build_model(name: str) -> torch.nn.Module:
    if name == "resnet18":
        import timm
        return timm.create_model("resnet18", pretrained=False, num_classes=1000)
    if name == "bert-base":
        from transformers import BertConfig, BertForSequenceClassification
        return BertForSequenceClassification(BertConfig())  # 12 layers, hidden 768: ~110M parameters
    raise ValueError(f"Unknown model {name!r}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel() > 0:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for st in opt.state.values():
        for v in st.values():
            add(v)
    for g in opt.param_groups:
        for k, v in g.items():
            if k != "params":
                add(v)
    return total


def bench_model(name: str, base: str, steps: int, warmup: int, gamma_lr: float) -> list[dict]:
    """One (parameter set, base rule): the torch baseline and the four trees, steps interleaved round-robin.

    Every optimizer updates its own copy of the parameters (fixed random gradients), so no optimizer's
    trajectory changes another's numbers.
    """
    torch.manual_seed(0)
    model = build_model(name)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    trees = {k: build_hierarchy(model, v) for k, v in TREES.items()}

    def copy():
        import copy as _copy
        m = _copy.deepcopy(model)
        for p, g in zip([q for q in m.parameters() if q.requires_grad], grads):
            p.grad = g
        return m

    opts = {}
    # every tree with the default kernels (fused where they apply), and the coarse / parameter trees again
    # with foreach=True, to show what the fused kernels save
    variants = [(k, {}) for k in trees] + [(k, dict(foreach=True)) for k in FOREACH_TOO]
    if base == "adam":
        m = copy()
        opts["torch.optim.Adam(foreach=True)"] = torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True)
        for k, kw in variants:
            opts[(k, bool(kw))] = CAMHDAdam(copy(), lr=1e-3, tree=trees[k], hypergrad_lr=1e-8, gamma_lr=gamma_lr, **kw)
    else:
        m = copy()
        opts["torch.optim.SGD(foreach=True)"] = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=True)
        for k, kw in variants:
            opts[(k, bool(kw))] = CAMHDSGD(copy(), lr=0.1, momentum=0.9, tree=trees[k], hypergrad_lr=1e-6,
                                           gamma_lr=gamma_lr, **kw)
    times = {k: [] for k in opts}
    for r in range(warmup + steps):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    ref = next(iter(opts))
    ref_med = statistics.median(times[ref])
    rows = []
    for k, opt in opts.items():
        med = statistics.median(times[k])
        tree, path = (k[0], opt._last_path) if k != ref else ("(torch baseline)", "")
        rows.append(dict(model=name, base=base, tree=tree, path=path, ms=med * 1e3,
                         ratio=med / ref_med, state=state_bytes(opt) / param_bytes))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,bert-base")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gamma-lr", type=float, default=0.01, help="δ used by the CAM-HD runs (0 = fixed γ)")
    ap.add_argument("--allocator", choices=("default", "no-trim"), default="default",
                    help="no-trim: glibc recycles freed memory (see the module docstring)")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # internal: one model:base, JSON out
    args = ap.parse_args(argv)
    if args._one:
        name, base = args._one.split(":")
        print(json.dumps(bench_model(name, base, args.steps, args.warmup, args.gamma_lr)))
        return
    if args.allocator == "no-trim" and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 32), MALLOC_TRIM_THRESHOLD_=str(1 << 36))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} steps after "
          f"{args.warmup} warm-up, gamma_lr={args.gamma_lr}, allocator={args.allocator}\n")
    print("| parameters | base | tree | kernels | step (ms) | × torch foreach | state bytes / param bytes |")
    print("|---|---|---|---|---:|---:|---:|")
    for name in args.models.split(","):
        for base in ("adam", "sgd"):
            # note: each (parameter set, base) in a fresh process: no memory or allocator state carries over
            cmd = [sys.executable, __file__, "--_one", f"{name}:{base}", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--gamma-lr", str(args.gamma_lr)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            for r in json.loads(out.strip().splitlines()[-1]):
                print(f"| {r['model']} | {r['base']} | {r['tree']} | {r['path']} | {r['ms']:.1f} | {r['ratio']:.2f} | "
                      f"{r['state']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
