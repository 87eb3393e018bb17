"""Run one of the tools with a planned SIGKILL, for tests/test_kill_resume.py (test-only; not part of the package).

    python tests/kill_workers/launch.py --module hf_camhd.cli compare ...
    python tests/kill_workers/launch.py --script scripts/train_image_classifier.py --model lenet5 ...

The environment variable ``CAMHD_KILL`` says where the process kills itself (``SIGKILL``: no handler,
no cleanup, exactly like the OOM killer or a preempted machine):

* ``step:N`` — right after the N-th optimizer step of this process (any ``torch.optim.Optimizer``);
* ``torn:N`` — inside the N-th ``torch.save`` of this process: the first half of the serialized bytes
  reach the file, then the process dies (a write torn in the middle of a checkpoint);
* ``before:<module>:<attribute path>:N`` — just before the N-th call of that function, e.g.
  ``before:hf_camhd.files:commit_dir:1`` (a finished temporary folder is never renamed into place) or
  ``before:matplotlib.figure:Figure.savefig:2``.

Without ``CAMHD_KILL`` the tool runs normally. The patches are installed before the tool's modules are
imported, so ``from x import f`` in the tool binds the patched ``f``.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import runpy
import signal
import sys


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(plan: str) -> None:
    kind, _, rest = plan.partition(":")
    if kind == "step":
        import torch

        target = int(rest)
        count = [0]

        def hook(optimizer, args, kwargs):
            count[0] += 1
            if count[0] == target:
                _die()

        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(hook)
    elif kind == "torn":
        import torch

        target = int(rest)
        count = [0]
        real_save = torch.save

        @functools.wraps(real_save)
        def save(obj, f, *args, **kwargs):
            count[0] += 1
            if count[0] != target:
                return real_save(obj, f, *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            if hasattr(f, "write"):
                f.write(data[: len(data) // 2])
                f.flush()
            else:
                with open(f, "wb") as fh:
                    fh.write(data[: len(data) // 2])
            _die()

        torch.save = save
    elif kind == "before":
        module_name, attr_path, n = rest.split(":")
        target = int(n)
        owner = importlib.import_module(module_name)
        *parents, name = attr_path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        real = getattr(owner, name)
        count = [0]

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == target:
                _die()
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)
    else:
        raise SystemExit(f"launch.py: unknown CAMHD_KILL plan {plan!r}")


def main() -> None:
    plan = os.environ.get("CAMHD_KILL")
    if plan:
        _install(plan)
    kind, target, *argv = sys.argv[1:]
    if kind == "--module":
        sys.argv = [target, *argv]
        module = importlib.import_module(target)
        sys.exit(module.main(argv))
    if kind == "--script":
        sys.argv = [target, *argv]
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")
        return
    raise SystemExit(f"launch.py: expected --module or --script, got {kind!r}")


if __name__ == "__main__":
    main()
