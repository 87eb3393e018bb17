"""The fused CPU step: CAM-HD's per-element work and the base rule in two passes over memory.

The multi-tensor path (:mod:`hf_camhd.optim._functional`) is a sequence of foreach ops, each one pass over
the model. Here the same maths runs as two C loops (``csrc/camhd_fused.c``):

* **pass A** (:func:`adam_first` / :func:`sgd_first`) — per element the sums
  ``Σ g ⊙ dir_old`` (per tensor, and per unit with a unit level; ``Σ α_offset ⊙ g ⊙ dir_old`` with a parameter
  level; ``Σ g²``, ``Σ dir_old²`` for the normalized rule), the parameter level's element-wise α update (its
  coefficient, from γ_param of step t−1, is known before the step: :class:`ParamLevel`), then the base rule's
  state (moments / momentum) and the new direction;
* the node sums, α of every other level and γ are then updated on those few numbers (the hyper-update);
* **pass B** (:func:`apply_many`) — ``θ ← θ + K ⊙ d`` with the combined rate (per element with a parameter level).

Every pass is one C call per param group and dtype, whatever the number of tensors: the tensors are cut into
chunks of 64 Ki elements that the threads share, and each chunk's sums are added in chunk order, so the sums
depend on the shapes alone, not on the thread count.

Where the base rule can rebuild the previous direction from its own state (Adam: ``m / (sqrt(v) + shift)``;
SGD with heavy-ball momentum: the buffer) nothing else is stored: the kernels take ``dir=None`` and read the
direction from the state before updating it, so CAM-HD keeps no parameter-sized buffer beyond the base
optimizer's (and the parameter level's α). AdamW (whose direction holds ``λθ_{t−1}``), Nesterov, plain SGD and
Schedule-Free keep it.

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc`` / ``gcc``), with
OpenMP when the compiler has it, into ``$HF_CAMHD_CACHE`` (default ``~/.cache/hf_camhd``), keyed by a hash
of the source, the compiler and the flags — once per machine (2½–4 minutes with gcc on 2 cores, the float
and the double kernels compiled at the same time: every specialisation is built for AVX-512, AVX2 and baseline
x86-64). ``-O2`` with the vectoriser on (what ``-O3`` adds that these kernels use) and ``-ffp-contract=off``.
Without a compiler :func:`load` returns ``None`` (and :func:`unavailable_reason` says why): ``fused=None`` falls
back to the foreach path, ``fused=True`` raises. It needs no Python or torch headers: tensors are passed as data
pointers through :mod:`ctypes` (which releases the GIL during the call).

Eligible steps: CPU tensors, float32 or float64, stored densely (contiguous or channels-last), with gradients
and state of the same dtype (:func:`ineligible_reason`), not sharded, and with a unit level only where units
run along dim 0 (per-unit rates are applied per row). Other steps use the foreach path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import Tensor


SOURCE = Path(__file__).with_name("csrc") / "camhd_fused.c"
# note: -ffp-contract=off keeps a·b + c two roundings, as torch's kernels round them (no FMA contraction in the
# AVX-512 clones), so a CAM-HD step that adapts nothing stays within a few ulps of torch.optim's
_COMPILE_TIMEOUT_S = 900  # a loaded 2-core machine takes a few minutes; past this the foreach path is used
# -O2 + the vectoriser: the kernels run as fast as with -O3, which takes twice as long to compile (about 2 min)
_FLAGS = ["-O2", "-ftree-vectorize", "-fvect-cost-model=dynamic", "-std=gnu99", "-fPIC", "-shared",
          "-fno-math-errno", "-ffp-contract=off"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False
_warned = False


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


def _writable_dirs() -> list[Path]:
    """The cache directory, then a per-user temporary one (for a read-only home)."""
    user = os.environ.get("USER") or os.environ.get("USERNAME") or "user"
    return [cache_dir(), Path(tempfile.gettempdir()) / f"hf_camhd-{user}"]


def _build(cc: list[str], flags: list[str], source: bytes) -> Path:
    """Compile ``SOURCE`` with ``flags`` into the cache, unless a build of the same ``source`` (the bytes of
    every file it is made of), compiler and flags is there. Concurrent processes race safely (atomic rename)."""
    key = hashlib.sha256(b"\0".join([source, " ".join(cc).encode(), " ".join(flags).encode(), sys.platform.encode(),
                                      platform.machine().encode()])).hexdigest()[:16]
    name = f"camhd_fused-{key}.so"
    err: Exception | None = None
    for folder in _writable_dirs():  # the next folder only when this one cannot be written
        if (folder / name).is_file():
            return folder / name
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        except OSError as e:
            err = e
            continue
        os.close(fd)
        try:
            _compile(cc, flags, tmp)
            os.replace(tmp, folder / name)
            return folder / name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"no writable folder for the compiled kernels ({err}); set $HF_CAMHD_CACHE")


def _compile(cc: list[str], flags: list[str], out: str) -> None:
    """``SOURCE`` → the shared library ``out``: its float and its double kernels (``-DCAMHD_PART=1`` / ``2``, about
    the same work each) compiled as two objects at the same time — on a machine with two cores or more the wait
    halves — then linked."""
    objects = [f"{out}.{part}.o" for part in (1, 2)]
    deadline = time.monotonic() + _COMPILE_TIMEOUT_S
    procs = [subprocess.Popen([*cc, *flags, f"-DCAMHD_PART={part}", "-c", "-o", obj, str(SOURCE)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for part, obj in zip((1, 2), objects)]
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cc)} could not compile {SOURCE.name} with {' '.join(flags)}: "
                                   f"{(stderr or stdout).strip()[-500:]}")
        link = subprocess.run([*cc, *flags, "-o", out, *objects], capture_output=True, text=True,
                              timeout=max(deadline - time.monotonic(), 1.0))
        if link.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} could not link {SOURCE.name}'s objects with {' '.join(flags)}: "
                               f"{(link.stderr or link.stdout).strip()[-500:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for obj in objects:
            if os.path.exists(obj):
                os.unlink(obj)


def _declare(lib: ctypes.CDLL) -> None:
    P, N, I, F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for sfx in _SUFFIX.values():
        off = [P, P, P, P, F]  # a parameter level's offsets, coefficients, bounds and α₀ (see ParamLevel)
        getattr(lib, f"camhd_adam_a_many_{sfx}").argtypes = [N] + [P] * 8 + off + [P, I, P] + [F] * 4 + [P] * 4
        getattr(lib, f"camhd_sgd_a_many_{sfx}").argtypes = [N] + [P] * 7 + off + [P, I, P, F, I, F, F, P, P]
        getattr(lib, f"camhd_apply_many_{sfx}").argtypes = [N] + [P] * 14
        for kind in ("adam_a", "sgd_a", "apply"):
            getattr(lib, f"camhd_{kind}_many_{sfx}").restype = ctypes.c_int
        getattr(lib, f"camhd_hyper_step_{sfx}").argtypes = [ctypes.POINTER(HyperArgs)]
        getattr(lib, f"camhd_hyper_step_{sfx}").restype = ctypes.c_int


def load() -> ctypes.CDLL | None:
    """The compiled kernels (built on first call, then cached), or ``None`` when they cannot be built."""
    global _lib, _reason, _loaded
    if _loaded:
        return _lib
    with _lock:
        if _loaded:
            return _lib
        cc = _compiler()
        if cc is None:
            _reason = "no C compiler found (set $CC, or install gcc / clang)"
        else:
            source = b"".join(f.read_bytes() for f in sorted(SOURCE.parent.iterdir()) if f.suffix in (".c", ".h"))
            errors = []
            for flags in ([*_FLAGS, "-fopenmp"], _FLAGS):  # multi-threaded where the compiler has OpenMP
                try:
                    lib = ctypes.CDLL(str(_build(shlex.split(cc), flags, source)))
                    _declare(lib)
                except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
                    errors.append(str(err))
                    continue
                _lib = lib
                break
            _reason = None if _lib is not None else "; ".join(errors)
        _loaded = True
    return _lib


def warn_unavailable_once() -> None:
    """Say once per process that the default path could not use the kernels (``fused=False`` silences it)."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"hf_camhd: the fused CPU kernels are unavailable ({unavailable_reason()}); using the "
                      "foreach kernels (same results, slower). Pass fused=False to silence this.", stacklevel=3)


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when the kernels are available)."""
    load()
    return _reason


def memory_format(t: Tensor) -> torch.memory_format | None:
    """The dense layout of ``t`` (contiguous, or channels-last for 4-d / 5-d tensors), ``None`` if neither."""
    if t.is_contiguous():
        return torch.contiguous_format
    for fmt, ndim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if t.ndim == ndim and t.is_contiguous(memory_format=fmt):
            return fmt
    return None


def ineligible_reason(tensors: list[tuple[str, Tensor | None]]) -> str | None:
    """Why these tensors (``(what, tensor)`` pairs of one parameter, the parameter first) cannot take the fused
    path, or ``None``. They must be CPU float32 / float64 tensors of one dtype, stored densely in one element
    order: all contiguous, or all channels-last (dim 0 stays outermost either way, as per-unit rows need)."""
    dtype = fmt = None
    for what, t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            return f"{what} is on {t.device} (the fused kernels are for CPU tensors)"
        if t.dtype not in _SUFFIX:
            return f"{what} has dtype {t.dtype} (the fused kernels take float32 / float64)"
        if dtype is not None and t.dtype != dtype:
            return f"{what} has dtype {t.dtype}, the parameter {dtype}"
        if fmt is None:
            fmt = memory_format(t)
            if fmt is None:
                return f"{what} is neither contiguous nor channels-last"
        elif not t.is_contiguous(memory_format=fmt):
            return f"{what} is not stored like the parameter ({fmt})"
        dtype = t.dtype
    return None


@dataclass
class ParamLevel:
    """The parameter level's element-wise update in pass A, per tensor: the offsets ``off = α − α₀`` (updated in
    place, clamped to ``[lo, hi]``) and the coefficient ``coef`` of the rule — additive ``off + coef · g ⊙ dir_old``,
    normalized ``α (1 − coef · sign(g ⊙ dir_old))``, chosen by pass A's ``norms`` (the normalized rule is the one
    that takes them); ``coef = 0``: the offsets stay. Entries where ``g ⊙ dir_old`` is not finite stay too.
    Pass B reads the same offsets (:attr:`offset_list`: their pointers are taken once per step)."""

    offsets: list[Tensor]
    coefs: list[float]
    lo: list[float]
    hi: list[float]
    a0: float

    def __post_init__(self):
        self.offset_list = PerTensor(self.offsets)

    def args(self) -> list:
        return [self.offset_list, *(PerTensor(x, ctypes.c_double) for x in (self.coefs, self.lo, self.hi)), self.a0]

    def pick(self, members: list[int]) -> ParamLevel:
        return ParamLevel(*([x[m] for m in members] for x in (self.offsets, self.coefs, self.lo, self.hi)), self.a0)


_NO_LEVEL = [None, None, None, None, 0.0]  # pass A's offset arguments without a parameter level


# ------------------------------------------------------------------------------------------ calling the kernels
# Every kernel takes all tensors of a list (of one dtype) in one call: ``camhd_<kind>_many_<dtype>(nt, sizes,
# row_lens, ...)``. The tensors are cut into chunks that the threads share, so a model of many small tensors costs
# one call, not one per tensor, and the sums do not depend on the thread count.

_TYPECODES = {ctypes.c_void_p: "Q", ctypes.c_int64: "q", ctypes.c_int32: "i", ctypes.c_double: "d"}


def c_array(ctype, values) -> array:
    """``values`` as a C array of ``ctype`` (an :class:`array.array`: built about 10× faster than a ctypes array;
    :func:`_run_many` passes its address and keeps it alive for the call)."""
    return array(_TYPECODES[ctype], values or [0])


class PerTensor:
    """One argument given per tensor, as a C array: tensors (or ``None``) → pointers (the whole argument ``NULL``
    when every one is ``None``), or numbers of ``ctype``. The arrays are built on first use and kept, so an
    argument that both passes of a step take (the parameters, the moments, the offsets) is read once per step;
    build a new one per step (the tensors' memory may move between steps)."""

    def __init__(self, values: list, ctype=ctypes.c_void_p):
        self.values, self.ctype = values, ctype
        self._memo: dict = {}

    def __len__(self) -> int:
        return len(self.values)

    def pick(self, idx: list[int]):
        """The C array of the values at ``idx`` (pointers, or numbers of ``ctype``)."""
        return self._memoized("pick", idx, self._array)

    def sizes(self, idx: list[int]) -> array:
        """The element counts of the tensors at ``idx``, as a C array."""
        return self._memoized("sizes", idx, lambda ts: c_array(ctypes.c_int64, [t.numel() for t in ts]))

    def by_dtype(self) -> list[list[int]]:
        """Indices of the tensors grouped by dtype (a kernel call takes one), in order."""
        return self._memoized("dtypes", range(len(self.values)), _by_dtype)

    def _memoized(self, what: str, idx, build):
        key = (what, None if len(idx) == len(self.values) else tuple(idx))
        if key not in self._memo:
            self._memo[key] = build(self.values if key[1] is None else [self.values[i] for i in idx])
        return self._memo[key]

    def _array(self, picked: list):
        if self.ctype is not ctypes.c_void_p:
            return c_array(self.ctype, picked)
        pointers = [0 if t is None else t.data_ptr() for t in picked]
        return c_array(ctypes.c_void_p, pointers) if any(pointers) else None


TensorList = Union[list, PerTensor]  # a list of tensors (or None), or a PerTensor taken earlier in this step


def _per_tensor(values: TensorList) -> PerTensor:
    return values if isinstance(values, PerTensor) else PerTensor(values)


_ROWS, _OUT = "rows", "out"  # markers: where the per-unit sum buffers and the (nt, 4) sums go in the arguments


def _by_dtype(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by dtype (a kernel call takes one), in order."""
    if len({t.dtype for t in tensors}) == 1:
        return [list(range(len(tensors)))]
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.values())


def _row_len(p: Tensor, count: int) -> int:
    return p.numel() // count if count else 1


def _run_many(kind: str, tensors: PerTensor, args: list,
              row_counts: list[int | None] | None = None) -> tuple[array | None, Tensor | None]:
    """Call ``camhd_<kind>_many`` once per dtype of ``tensors`` with ``(nt, sizes, row_lens, *args)``.
    ``args``: :class:`PerTensor` lists, plain values, and the markers ``_ROWS`` / ``_OUT`` (per-unit and
    per-tensor sum buffers, returned: the sums of every tensor as a float64 C array of ``T × 4`` (row-major), and a
    ``(rows, 4)`` float64 tensor holding the rows of every tensor with ``row_counts[i]`` end to end, in order; else
    ``None``). ``row_counts[i]``: tensor i's rows along dim 0 (units, or the rows of a per-unit rate), or ``None``."""
    by_dtype, values = tensors.by_dtype(), tensors.values
    totals = sum_array(len(values)) if _OUT in args else None
    rows = row_at = None
    if _ROWS in args and row_counts is not None and any(c is not None for c in row_counts):
        row_at, n = [], 0
        for c in row_counts:  # where each tensor's rows start, in bytes from the buffer's start
            row_at.append(None if c is None else 32 * n)
            n += c or 0
        rows = torch.zeros(n, 4, dtype=torch.float64)
    for idx in by_dtype:
        ts = [values[i] for i in idx] if len(by_dtype) > 1 else values
        counts = [None] * len(idx) if row_counts is None else [row_counts[i] for i in idx]
        row_lens = None if all(c is None for c in counts) else c_array(
            ctypes.c_int64, [0 if c is None else _row_len(t, c) for t, c in zip(ts, counts)])
        out = totals if len(by_dtype) == 1 or totals is None else sum_array(len(idx))
        call = [tensors.sizes(idx), row_lens]
        for a in args:
            if isinstance(a, PerTensor):
                call.append(a.pick(idx))
            elif a is _OUT:
                call.append(address(out))
            elif a is _ROWS:
                base = rows.data_ptr() if rows is not None else 0
                call.append(None if row_lens is None else c_array(
                    ctypes.c_void_p, [0 if row_at[i] is None else base + row_at[i] for i in idx]))
            else:
                call.append(a)
        fn = getattr(load(), f"camhd_{kind}_many_{_SUFFIX[ts[0].dtype]}")
        if fn(len(idx), *(a.buffer_info()[0] if isinstance(a, array) else a for a in call)) != 0:
            raise MemoryError(f"camhd_{kind}_many could not allocate its chunk list ({len(idx)} tensors)")
        if out is not totals:
            for j, i in enumerate(idx):
                totals[4 * i:4 * i + 4] = out[4 * j:4 * j + 4]
    return totals, rows


def sum_array(n: int) -> array:
    """A zeroed float64 C array for the ``(n, 4)`` sums of pass A. Not a tensor: around the passes every cache is
    cold, and each kind of torch operation then costs some 100 µs."""
    return array("d", bytes(32 * n))


def _rows_of(k_rows: list[Tensor | None]) -> list[int | None]:
    return [None if r is None else r.numel() for r in k_rows]


# ------------------------------------------------------------------------------------------ passes A and B
# Pass A reads g and the previous direction once, for the sums, the parameter level's α and the base rule's update
# that overwrites it; pass B moves θ once the rates are known.

def adam_first(params: TensorList, grads: list[Tensor], dirs: TensorList, exp_avgs: TensorList, exp_avg_sqs: TensorList,
               max_exp_avg_sqs: TensorList | None, level: ParamLevel | None, unit_counts: list[int | None],
               norms: bool, wd: float, beta1: float, beta2: float, shifts: list[float], prev_shifts: list[float],
               u_scales: list[Tensor], u_values: list[float]) -> tuple[array, Tensor | None]:
    """Pass A for Adam / AdamW on a list of tensors: returns the sums ``[Σ g·dir_old, Σ off·g·dir_old, Σ g²,
    Σ dir_old²]`` of every tensor as a float64 C array of ``T × 4`` (the second with a parameter ``level``, the
    norms with ``norms``) and per unit (a ``(units, 4)`` tensor: the units of every tensor with ``unit_counts[i]``
    end to end), then the parameter level's offsets (:class:`ParamLevel`), the moments (L2 decay ``wd`` enters the
    gradient) and ``dir ← q = m / (sqrt(v) + shift)``; ``u_scales[i] ← u_values[i]``. ``dirs[i] = None``: the
    direction is not kept; ``dir_old`` is rebuilt as ``m / (sqrt(v) + prev_shift)`` from the moments before the
    update. Tensor lists may be given as :class:`PerTensor` (pass B then reuses their pointers)."""
    params = _per_tensor(params)
    n = len(params)
    return _run_many("adam_a", params, [
        params, PerTensor(grads), _per_tensor(dirs), _per_tensor(exp_avgs), _per_tensor(exp_avg_sqs),
        _per_tensor(max_exp_avg_sqs if max_exp_avg_sqs is not None else [None] * n),
        *(level.args() if level is not None else _NO_LEVEL), _ROWS, int(norms), _OUT,
        wd, 1.0 - beta1, beta2, 1.0 - beta2, PerTensor(shifts, ctypes.c_double),
        PerTensor(prev_shifts, ctypes.c_double), PerTensor(u_scales), PerTensor(u_values, ctypes.c_double)],
        unit_counts)


def sgd_first(params: TensorList, grads: list[Tensor], dirs: TensorList, bufs: TensorList, first: list[bool],
              level: ParamLevel | None, unit_counts: list[int | None], norms: bool, wd: float, momentum: int,
              mu: float, dampening: float, u_scales: list[Tensor], u_values: list[float]) -> tuple[array, Tensor | None]:
    """Pass A for SGD on a list of tensors (``momentum``: 0 plain, 1 heavy ball, 2 Nesterov; ``first[i]``: the
    buffer starts as the gradient, as torch's): the sums and the parameter ``level`` as :func:`adam_first`, then the
    buffers and ``dir ← d``. ``dirs[i] = None`` (heavy ball only): the direction is the buffer, not kept
    (``dir_old`` = the buffer before the update, 0 on the first step)."""
    params = _per_tensor(params)
    n = len(params)
    return _run_many("sgd_a", params, [
        params, PerTensor(grads), _per_tensor(dirs), _per_tensor(bufs) if momentum else PerTensor([None] * n),
        PerTensor([int(f) for f in first], ctypes.c_int32), *(level.args() if level is not None else _NO_LEVEL),
        _ROWS, int(norms), _OUT, wd, momentum, mu, dampening, PerTensor(u_scales),
        PerTensor(u_values, ctypes.c_double)], unit_counts)


def apply_many(params: TensorList, dirs: TensorList, k_rows: list[Tensor | None], ka: list[float], da: list[float],
               dd: list[float], quotients: tuple[TensorList, TensorList, list] | None = None,
               fine: tuple[TensorList, list[float], list[float]] | None = None) -> None:
    """Pass B on a list of tensors: ``θ ← θ (1 + da) + ka · dir`` (``k_rows[i]``: float64, one factor per unit
    along dim 0 multiplying ka and da, or ``None``); with ``dd`` (decoupled decay) the stored direction becomes
    ``dir + dd · θ_old``. ``dirs[i] = None``: the direction is Adam's ``m / (sqrt(v) + shift)`` from
    ``quotients = (ms, vs, shifts)`` (not kept; ``dd[i]`` must be 0). ``fine = (offsets, kb, db)`` (a parameter
    level): the rates are per element, ``ka + kb · off`` and ``da + db · off``. Tensor lists may be the
    :class:`PerTensor` objects that pass A took."""
    params = _per_tensor(params)
    none = PerTensor([None] * len(params))
    ms, vs, shifts = quotients if quotients is not None else (none, none, None)
    offsets, kb, db = fine if fine is not None else (none, None, None)
    _run_many("apply", params, [
        params, _per_tensor(dirs), _per_tensor(ms), _per_tensor(vs), _per_tensor(offsets),
        None if shifts is None else PerTensor(shifts, ctypes.c_double), PerTensor(k_rows),
        PerTensor(ka, ctypes.c_double), PerTensor(da, ctypes.c_double),
        *(None if x is None else PerTensor(x, ctypes.c_double) for x in (kb, db)),
        PerTensor(dd, ctypes.c_double)], _rows_of(k_rows))


# ------------------------------------------------------------------------------------------ the hyper-update
class HyperArgs(ctypes.Structure):
    """``camhd_hyper_args`` of the C source: what :func:`hyper_step` reads and writes (field by field documented
    there). Pointers are data pointers of contiguous CPU tensors of the hyper-state's dtype (0: absent)."""

    _fields_ = [(name, ctypes.c_int64) for name in (
        "nt", "channels", "levels", "adapt", "normalized", "softmax", "decay", "n_block", "n_layer", "pos_block",
        "pos_layer", "pos_unit", "pos_param", "n_unit_groups")] + [(name, ctypes.c_void_p) for name in (
        "totals", "scales", "block_of", "layer_of", "alpha_global", "alpha_block", "alpha_layer", "stats_global",
        "stats_block", "stats_layer", "beta_global", "beta_block", "beta_layer", "unit_alpha", "unit_stats",
        "unit_sizes", "unit_sums", "unit_beta", "gamma_unit_part", "gamma", "gamma_logits", "gamma_grad",
        "skipped")] + [(name, ctypes.c_double) for name in (
        "lr", "hypergrad_lr", "gamma_lr", "smoothing_weight", "alpha_min", "alpha_max", "alpha_inf", "tau")] + [
        (name, ctypes.c_void_p) for name in ("node_sums", "gradient", "rates")]


def hyper_step(args: HyperArgs, dtype: torch.dtype) -> bool:
    """Steps 2–4 of a fused CPU step in one C call (``camhd_hyper_step_*``): with ``args.adapt`` the node sums,
    α of the coarse and unit levels and γ, updated in place, then the combined rates. Returns whether α and γ
    moved (``False``: not asked, or the sums were not finite — then ``args.skipped`` was counted up). The caller
    keeps the tensors and C arrays that ``args`` points to alive."""
    code = getattr(load(), f"camhd_hyper_step_{_SUFFIX[dtype]}")(ctypes.byref(args))
    if code < 0:
        raise ValueError(f"the fused hyper-update takes at most 8 levels, got {args.levels}")
    return code == 1


def pointers(tensors: list[Tensor]) -> array:
    """The data pointers of ``tensors`` as a C array."""
    return c_array(ctypes.c_void_p, [t.data_ptr() for t in tensors])


def address(a: array) -> int:
    """The address of a C array made by :func:`pointers` or :func:`c_array`."""
    return a.buffer_info()[0]

