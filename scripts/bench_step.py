"""Time ``optimizer.step()`` of CAM-HD against torch's fused optimizers (the ones users run) in the same run.

Parameter sets: the shapes of a timm ResNet-18 and of a BERT-base-sized transformer (both built from
config, no weights). Each base is timed against its torch counterpart: ``CAMHDAdam`` vs
``torch.optim.Adam(fused=True)``, ``CAMHDAdamW`` vs ``AdamW(fused=True)``, ``CAMHDSGD`` (momentum 0.9) vs
``SGD(fused=True)``; the ``foreach`` version of the torch optimizer is a second column. Trees: global;
global+layer; global+layer+unit; global+layer+parameter. Steps are interleaved round-robin across
optimizers (so machine noise hits all of them alike) and each ratio is median(step time) / median(step time
of the torch baseline) over ``--steps`` steps after ``--warmup``. State bytes count every tensor the
optimizer holds (per-parameter state and group tensors) divided by the parameter bytes.

    python scripts/bench_step.py                   # both models, every base, markdown table
    python scripts/bench_step.py --models resnet18 --bases adam --steps 30
    python scripts/bench_step.py --compiled         # also torch.compile(opt.step) rows (slow to compile)
    python scripts/bench_step.py --allocator no-trim   # glibc keeps freed memory: no page-fault cost
    python scripts/bench_step.py --device cuda --dtype bfloat16 --models resnet50,bert-base --bases adamw

Allocator note: torch's foreach optimizers allocate parameter-sized temporaries every step; with glibc's
default settings that memory is returned to the OS and page-faulted back every step. The fused ones (the
anchor) and CAM-HD's fused kernels allocate none. ``--allocator no-trim`` re-runs the script with
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set so allocations are recycled.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from hf_camhd import CAMHDAdam, CAMHDAdamW, CAMHDSGD, build_hierarchy

TREES = {
    "global": ("global",),
    "global+layer": ("global", "layer"),
    "global+layer+unit": ("global", "layer", "unit"),
    "global+layer+parameter": ("global", "layer", "parameter"),
}
BASES = {  # CAM-HD class and settings, the torch class and settings
    "adam": (CAMHDAdam, dict(lr=1e-3), torch.optim.Adam, dict(lr=1e-3)),
    "adamw": (CAMHDAdamW, dict(lr=1e-3, weight_decay=1e-2), torch.optim.AdamW,
              dict(lr=1e-3, weight_decay=1e-2)),
    "sgd": (CAMHDSGD, dict(lr=0.1, momentum=0.9), torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
}


def build_model(name: str) -> torch.nn.Module:
    if name in ("resnet18", "resnet50"):
        import timm
        return timm.create_model(name, pretrained=False, num_classes=1000)
    if name == "bert-base":
        from transformers import BertConfig, BertForSequenceClassification
        return BertForSequenceClassification(BertConfig())  # 12 layers, hidden 768: ~110M parameters
    raise ValueError(f"Unknown model {name!r}; expected resnet18, resnet50 or bert-base")


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


def bench_model(name: str, base: str, steps: int, warmup: int, gamma_lr: float, compiled: bool, device: str,
                dtype: torch.dtype, tree_names: list[str]) -> list[dict]:
    """One (parameter set, base rule): torch fused and foreach, and the four trees, steps interleaved.

    Every optimizer updates its own copy of the parameters (fixed random gradients), so no optimizer's
    trajectory changes another's numbers.
    """
    torch.manual_seed(0)
    model = build_model(name).to(device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    trees = {k: build_hierarchy(model, TREES[k]) for k in tree_names}
    cls, kw, torch_cls, torch_kw = BASES[base]

    def copy_model():
        m = copy.deepcopy(model)
        for p, g in zip([q for q in m.parameters() if q.requires_grad], grads):
            p.grad = g
        return m

    opts = {"fused": torch_cls(copy_model().parameters(), fused=True, **torch_kw),
            "foreach": torch_cls(copy_model().parameters(), foreach=True, **torch_kw)}
    for k, tree in trees.items():
        opts[k] = cls(copy_model(), tree=tree, gamma_lr=gamma_lr, **kw)
    steppers = {k: o.step for k, o in opts.items()}
    if compiled:  # the whole step through torch.compile (inductor), as a user compiling their train step would
        for k in [t for t in ("global+layer", "global+layer+parameter") if t in trees]:
            opt = cls(copy_model(), tree=trees[k], gamma_lr=gamma_lr, lr=torch.tensor(kw["lr"]),
                      **{a: v for a, v in kw.items() if a != "lr"})
            opts[k + " (compiled)"] = opt
            steppers[k + " (compiled)"] = torch.compile(opt.step)
    times = {k: [] for k in opts}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for r in range(warmup + steps):
        for k, step in steppers.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k, opt in opts.items():
        path = "torch" if k in ("fused", "foreach") else ("torch.compile" if "compiled" in k else opt._last_path)
        rows.append(dict(model=name, base=base, tree=f"torch {torch_cls.__name__}({k}=True)" if k in ("fused", "foreach")
                         else k, path=path, ms=med[k] * 1e3, fused=med[k] / med["fused"],
                         foreach=med[k] / med["foreach"], state=state_bytes(opt) / param_bytes))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,bert-base")
    ap.add_argument("--bases", default="adam,adamw,sgd")
    # note: 40 steps: on a shared 2-core machine one step's time varies by ±25 %, and the median of 15 moved the
    # ratios by ±0.1 between runs; the first few steps of torch's fused step run slower, hence 5 warm-up
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--gamma-lr", type=float, default=0.01, help="δ used by the CAM-HD runs (0 = fixed γ)")
    ap.add_argument("--compiled", action="store_true", help="add torch.compile(opt.step) rows")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA CAM-HD's default is its compiled step)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="parameter dtype")
    ap.add_argument("--trees", default=",".join(TREES), help=f"comma-separated, from {', '.join(TREES)}")
    ap.add_argument("--allocator", choices=("default", "no-trim"), default="default",
                    help="no-trim: glibc recycles freed memory (see the module docstring)")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # internal: one model:base, JSON out
    args = ap.parse_args(argv)
    if args._one:
        name, base = args._one.split(":")
        print(json.dumps(bench_model(name, base, args.steps, args.warmup, args.gamma_lr, args.compiled, args.device,
                                     getattr(torch, args.dtype), args.trees.split(","))))
        return
    if args.allocator == "no-trim" and "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 32), MALLOC_TRIM_THRESHOLD_=str(1 << 36))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    where = (torch.cuda.get_device_name() if args.device == "cuda" else
             f"{torch.get_num_threads()} CPU threads ({torch.backends.cpu.get_cpu_capability()})")
    print(f"torch {torch.__version__}, {where}, {args.dtype} parameters, median of {args.steps} steps after "
          f"{args.warmup} warm-up, gamma_lr={args.gamma_lr}, allocator={args.allocator}\n")
    print("| parameters | base | tree | kernels | step (ms) | × torch fused | × torch foreach | state bytes / param bytes |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        for base in args.bases.split(","):
            # note: each (parameter set, base) in a fresh process: no memory or allocator state carries over
            cmd = [sys.executable, __file__, "--_one", f"{name}:{base}", "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--gamma-lr", str(args.gamma_lr), "--device", args.device,
                   "--dtype", args.dtype, "--trees", args.trees] + (["--compiled"] if args.compiled else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            for r in json.loads(out.strip().splitlines()[-1]):
                print(f"| {r['model']} | {r['base']} | {r['tree']} | {r['path']} | {r['ms']:.1f} | {r['fused']:.2f} | "
                      f"{r['foreach']:.2f} | {r['state']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
