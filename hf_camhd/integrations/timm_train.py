"""Run timm's own ``train.py`` with the CAM-HD optimizers: ``python -m hf_camhd.integrations.timm_train TRAIN_PY ARGS``.

timm's training script is not part of the timm package: take it from the timm repository (the version that
matches your installed timm, e.g. ``https://github.com/huggingface/pytorch-image-models/blob/main/train.py``).
This launcher runs it unchanged, as ``python TRAIN_PY ARGS`` would, after two things:

1. the names ``camhdadam``, ``camhdadamw``, ``camhdsgd``, ``camhdsgdn`` are registered in timm's optimizer
   registry (:func:`hf_camhd.integrations.timm.register_timm_optimizers`), so ``--opt camhdadamw`` is found;
2. ``timm.optim.create_optimizer_v2`` — the one function ``train.py`` calls to build its optimizer — is
   :func:`hf_camhd.integrations.timm.create_optimizer_v2`: timm's own, plus the model's learning-rate tree for
   the CAM-HD names (``train.py`` hands its model to it, never to the optimizer class). Every other optimizer
   name behaves exactly as in timm.

CAM-HD settings go through ``train.py``'s own ``--opt-kwargs``::

    python -m hf_camhd.integrations.timm_train train.py --data-dir imagenette2-320 --model resnet18 \\
        --opt camhdadamw --lr 1e-3 --weight-decay 0.05 \\
        --opt-kwargs levels=global,block,layer hypergrad_lr=0.01 gamma_lr=0.01

Everything else (``--sched``, ``--layer-decay``, AMP, ``torchrun --nproc_per_node N -m
hf_camhd.integrations.timm_train train.py ...`` for several GPUs, checkpoints and ``--resume``) is
``train.py``'s. The optimizer state — α at every level, γ and the tree — is in the checkpoints it saves.

    >>> from hf_camhd.integrations.timm_train import main
    >>> main(["no/such/train.py"])   # prints: ... error: TRAIN_PY 'no/such/train.py' does not exist; ...
    2
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from .._extras import require

require("hf_camhd.integrations.timm_train", "timm")
from .timm import create_optimizer_v2, register_timm_optimizers  # noqa: E402

__all__ = ["main", "prepare_timm"]

_PROG = "hf_camhd.integrations.timm_train"
_USAGE = f"usage: python -m {_PROG} TRAIN_PY [train.py arguments ...]"


def prepare_timm() -> None:
    """Register the CAM-HD names and make ``timm.optim.create_optimizer_v2`` build their trees (see above)."""
    import timm.optim

    register_timm_optimizers()
    # note: train.py does `from timm.optim import create_optimizer_v2` when it starts, so it picks this up
    timm.optim.create_optimizer_v2 = create_optimizer_v2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``TRAIN_PY`` with ``argv[1:]`` as its arguments; returns 2 on a usage error, else ``train.py``'s status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n    >>>")[0] if argv else _USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    script = Path(argv[0])
    if not script.is_file():
        print(f"{_PROG}: error: TRAIN_PY {argv[0]!r} does not exist; pass the path of timm's train.py (from "
              "https://github.com/huggingface/pytorch-image-models)", file=sys.stderr)
        return 2
    prepare_timm()
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))  # as `python train.py` would
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


if __name__ == "__main__":
    sys.exit(main())
