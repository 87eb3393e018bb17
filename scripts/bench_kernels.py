"""Time each pass of the fused CPU kernels against torch's fused Adam and plain memory streams, in GB/s.

Which part of a CAM-HD step is memory-bound and which is not: every pass of ``hf_camhd.optim._fused`` (the
Adam flavour, the previous direction rebuilt from the moments as the default CAMHDAdam does) on ``--tensors``
float32 tensors of ``--numel`` elements each, next to torch's ``Adam(fused=True)`` step and three plain streams
(``torch._foreach_copy_``: one read and one write per element; ``torch.linalg.vecdot``: two reads;
``Tensor.sum``: one read). All of them run interleaved round-robin, ``--rounds`` times, and each row reports the
median time and the bytes it must move divided by that time. A pass that reaches the streams' GB/s is
memory-bound: only fewer passes make it faster.

    python scripts/bench_kernels.py                         # 40 tensors of 2.75 M elements (BERT-base size)
    python scripts/bench_kernels.py --tensors 62 --numel 190000   # ResNet-18 size
    python scripts/bench_kernels.py --overhead      # the step's cost outside the kernels (ResNet-18's tensors)
    python scripts/bench_kernels.py --threads 1     # every pass on one thread (torch.set_num_threads)

``--overhead`` times whole steps of CAMHDAdam (global+layer) and torch's fused Adam on the 62 tensors of a timm
ResNet-18 shrunk to 8 elements each, so that what remains is each step's fixed cost (Python, tiny hyper-update
ops, kernel calls), with 64 MB written between steps: caches as cold as they are after a backward pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_camhd.optim import _fused


def overhead(rounds: int) -> None:
    """Median step time of CAMHDAdam (global+layer) and torch's fused Adam on ResNet-18's tensors at 8 elements."""
    import timm

    from hf_camhd import CAMHDAdam, build_hierarchy

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    for p in model.parameters():
        p.data = torch.zeros(8)
    opts = {"torch Adam(fused=True)": torch.optim.Adam(model.parameters(), lr=1e-3, fused=True),
            "CAMHDAdam global+layer": CAMHDAdam(model, tree=build_hierarchy(model, ("global", "layer")), lr=1e-3,
                                                gamma_lr=0.01)}
    for p in model.parameters():
        p.grad = torch.randn(8)
    flush = torch.empty(16_000_000)
    times = {name: [] for name in opts}
    for r in range(rounds + 20):
        for name, opt in opts.items():
            flush.fill_(1.0)
            t0 = time.perf_counter()
            opt.step()
            if r >= 20:
                times[name].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ResNet-18's 62 tensors at 8 elements each, "
          f"64 MB written before every step, median of {rounds} interleaved rounds\n")
    print("| step | ms |\n|---|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.2f} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=40)
    ap.add_argument("--numel", type=int, default=2_750_000)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--overhead", action="store_true", help="time whole steps on tiny tensors instead (see above)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (the kernels share its OpenMP "
                    "runtime); default: torch's")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads {args.threads}: give a positive number of threads")
        torch.set_num_threads(args.threads)
    if _fused.load() is None:
        raise SystemExit(f"the fused kernels are unavailable: {_fused.unavailable_reason()}")
    if args.overhead:
        overhead(max(args.rounds, 100))
        return
    n, k = args.numel, args.tensors
    gen = torch.Generator().manual_seed(0)

    def tensors(positive=False):
        out = [torch.randn(n, generator=gen) for _ in range(k)]
        return [t.abs_() for t in out] if positive else out

    params, grads, ms, vs, offs = tensors(), tensors(), tensors(), tensors(True), tensors()
    torch_params = tensors()
    for p, g in zip(torch_params, grads):
        p.grad = g
    adam = torch.optim.Adam(torch_params, lr=1e-9, fused=True)
    adam.step()  # creates its state
    zeros, none = [0.0] * k, [None] * k
    shift, scales = [1e-8] * k, [torch.zeros(()) for _ in range(k)]
    # the normalized rule's element-wise update of the parameter level, at a negligible rate
    level = _fused.ParamLevel(offs, [1e-9] * k, [-1.0] * k, [1.0] * k, 1e-3)
    cases = {  # name: (call, four-byte streams per element)
        "torch Adam(fused=True) step": (adam.step, 7),
        "torch foreach copy_ (1 read, 1 write)": (lambda: torch._foreach_copy_(params, grads), 2),
        "torch vecdot (2 reads)": (lambda: [torch.linalg.vecdot(a, b) for a, b in zip(grads, ms)], 2),
        "torch sum (1 read)": (lambda: [g.sum() for g in grads], 1),
        "pass A, Adam, global+layer": (lambda: _fused.adam_first(
            params, grads, none, ms, vs, None, None, none, True, 0.0, 0.9, 0.999, shift, shift, scales, zeros), 5),
        "pass B, Adam": (lambda: _fused.apply_many(params, none, none, zeros, zeros, zeros, (ms, vs, shift)), 4),
        "pass A, Adam, +parameter": (lambda: _fused.adam_first(
            params, grads, none, ms, vs, None, level, none, True, 0.0, 0.9, 0.999, shift, shift, scales, zeros), 7),
        "pass B, Adam, +parameter": (lambda: _fused.apply_many(
            params, none, none, zeros, zeros, zeros, (ms, vs, shift), (offs, zeros, zeros)), 5),
    }
    times = {name: [] for name in cases}
    for r in range(args.rounds + 1):
        for name, (call, _) in cases.items():
            t0 = time.perf_counter()
            call()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {k} float32 tensors of {n} elements, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| what | streams (4 B / element) | ms | GB/s |\n|---|---:|---:|---:|")
    for name, (_, streams) in cases.items():
        ms_ = statistics.median(times[name]) * 1e3
        # 3 significant digits: a tiny run never prints 0
        print(f"| {name} | {streams} | {ms_:.3g} | {streams * 4 * n * k / ms_ / 1e6:.3g} |")


if __name__ == "__main__":
    main()
