"""The fused CPU step: CAM-HD's per-element work and the base rule in two passes over memory.

The foreach path (:mod:`hf_camhd.optim._kernels`) is a sequence of multi-tensor ops, each one pass over
the model; with a parameter-level tree that is about twice the memory traffic of torch's Adam. Here the
same maths runs as two C loops per tensor (``csrc/camhd_fused.c``):

* **pass 1** (:func:`partial_sums`) — ``Σ g ⊙ dir`` and ``Σ α_offset ⊙ g ⊙ dir`` (reads g, dir, α);
  the node sums, α of the coarse levels and γ are then updated on these few numbers in Python;
* **pass 2** (:func:`adam` / :func:`sgd`) — per element: the parameter-level ``α`` update of step 2 (with
  the γ of step t−1), the base rule's state (moments / momentum), ``θ ← θ + K ⊙ d`` with the rate of step 4,
  and the next ``dir`` — written over the previous one after it has been read.

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc`` / ``gcc``), with
OpenMP when the compiler has it, into ``$HF_CAMHD_CACHE`` (default ``~/.cache/hf_camhd``), keyed by a hash
of the source, the compiler and the flags — a fraction of a second, once per machine. Without a compiler
:func:`load` returns ``None`` (and :func:`unavailable_reason` says why): ``fused=None`` falls back to the
foreach path, ``fused=True`` raises. It needs no Python or torch headers: tensors are passed as data
pointers through :mod:`ctypes` (which releases the GIL during the call).

Eligible tensors (:func:`ineligible_reason`): CPU, float32 or float64, contiguous, with gradients and
CAM-HD state of the same dtype, not sharded. Other steps use the foreach path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "camhd_fused.c"
_FLAGS = ["-O3", "-std=gnu99", "-fPIC", "-shared", "-fno-math-errno"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$HF_CAMHD_CACHE``, else ``$XDG_CACHE_HOME/hf_camhd`` or ``~/.cache/hf_camhd``."""
    env = os.environ.get("HF_CAMHD_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_camhd"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _build(cc: str, source: bytes) -> Path:
    """Compile (with OpenMP, else without) into the cache; concurrent processes race safely (atomic rename)."""
    last_err = ""
    for extra in (["-fopenmp"], []):
        flags = [*_FLAGS, *extra]
        key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(),
                                          sys.platform.encode(), os.uname().machine.encode()])).hexdigest()[:16]
        target = cache_dir() / f"camhd_fused-{key}.so"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return target
            last_err = (proc.stderr or proc.stdout).strip()[-500:]
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} could not compile {SOURCE.name}: {last_err}")


def _declare(lib: ctypes.CDLL) -> None:
    P, N, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for sfx in _SUFFIX.values():
        getattr(lib, f"camhd_hsum_{sfx}").argtypes = [P, P, P, N, P]
        getattr(lib, f"camhd_adam_{sfx}").argtypes = [P] * 7 + [N, I, F, F, F, F, F, I, F, F, F, F, F, F, F, F]
        getattr(lib, f"camhd_sgd_{sfx}").argtypes = [P] * 5 + [N, I, F, F, F, F, F, F, I, I, F, F]
        for kind in ("hsum", "adam", "sgd"):
            getattr(lib, f"camhd_{kind}_{sfx}").restype = None


def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call, then cached), or ``None`` when they cannot be built."""
    global _lib, _reason, _loaded
    if _loaded:
        return _lib
    with _lock:
        if _loaded:
            return _lib
        try:
            cc = _compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set $CC, or install gcc / clang)")
            lib = ctypes.CDLL(str(_build(cc, SOURCE.read_bytes())))
            _declare(lib)
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            _reason = str(err)
        _loaded = True
    return _lib


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when the kernels are available)."""
    load()
    return _reason


def ineligible_reason(tensors: list[tuple[str, Tensor | None]]) -> str | None:
    """Why these tensors (``(what, tensor)`` pairs of one parameter) cannot take the fused path, or ``None``."""
    dtype = None
    for what, t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            return f"{what} is on {t.device} (the fused kernels are for CPU tensors)"
        if t.dtype not in _SUFFIX:
            return f"{what} has dtype {t.dtype} (the fused kernels take float32 / float64)"
        if dtype is not None and t.dtype != dtype:
            return f"{what} has dtype {t.dtype}, the parameter {dtype}"
        if not t.is_contiguous():
            return f"{what} is not contiguous"
        dtype = t.dtype
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def partial_sums(grads: list[Tensor], dirs: list[Tensor], offsets: list[Tensor] | None) -> Tensor:
    """Pass 1: a ``(T, 2)`` float64 tensor of ``[Σ g ⊙ dir, Σ off ⊙ g ⊙ dir]`` per tensor (second column
    0 without ``offsets``). Sums accumulate in float64, in a fixed order for a given thread count."""
    lib = load()
    out = torch.zeros(len(grads), 2, dtype=torch.float64)
    base, stride = out.data_ptr(), 2 * out.element_size()
    for i, (g, d) in enumerate(zip(grads, dirs)):
        fn = getattr(lib, f"camhd_hsum_{_SUFFIX[g.dtype]}")
        fn(g.data_ptr(), d.data_ptr(), _ptr(offsets[i] if offsets is not None else None), g.numel(), base + i * stride)
    return out


def adam(p: Tensor, g: Tensor, d: Tensor, off: Tensor | None, m: Tensor, v: Tensor, vmax: Tensor | None,
         alpha: tuple, ka: float, kb: float, decoupled: bool, da: float, db: float, dd: float,
         wd: float, beta1: float, beta2: float, shift: float) -> None:
    """Pass 2 for Adam / AdamW on one tensor, in place: see ``camhd_adam_*`` in the C source.

    ``θ ← θ (1 + da + db·off)`` (decoupled only) ``+ (ka + kb·off) · q`` with ``q = m / (sqrt(v) + shift)``;
    ``dir ← q + dd·θ_old`` (decoupled) or ``q``; L2 decay ``wd`` enters the moments' gradient.
    """
    fn = getattr(load(), f"camhd_adam_{_SUFFIX[p.dtype]}")
    fn(p.data_ptr(), g.data_ptr(), d.data_ptr(), _ptr(off), m.data_ptr(), v.data_ptr(), _ptr(vmax), p.numel(),
       *alpha, ka, kb, int(decoupled), da, db, dd, wd, 1.0 - beta1, beta2, 1.0 - beta2, shift)


def sgd(p: Tensor, g: Tensor, d: Tensor, off: Tensor | None, buf: Tensor | None, alpha: tuple, ka: float,
        kb: float, wd: float, momentum: int, first: bool, mu: float, dampening: float) -> None:
    """Pass 2 for SGD on one tensor, in place (``momentum``: 0 plain, 1 heavy ball, 2 Nesterov; ``first``:
    the momentum buffer starts as the gradient, as torch's). ``θ ← θ + (ka + kb·off) · d``, ``dir ← d``."""
    fn = getattr(load(), f"camhd_sgd_{_SUFFIX[p.dtype]}")
    fn(p.data_ptr(), g.data_ptr(), d.data_ptr(), _ptr(off), _ptr(buf), p.numel(), *alpha, ka, kb, wd,
       momentum, int(first), mu, dampening)
