"""CAM-HD in ``accelerate`` scripts: ``accelerator.prepare(model, optimizer, ...)`` needs nothing from here.

What already works, and why (checked against accelerate 1.15):

* ``prepare()`` wraps the optimizer in ``AcceleratedOptimizer``, which round-trips ``state_dict()`` →
  ``load_state_dict()``: CAM-HD creates its state lazily in ``step()``, keeps its hyper-state in fp32 through
  load hooks (also on bf16 parameters) and never caches references to state or group tensors.
* fp16 (``GradScaler``): on an inf/NaN step the scaler does not call ``step()`` at all, so α, γ, moments and u
  are untouched; grads are unscaled before ``step()``. Gradient accumulation: ``step()`` only runs on
  sync steps, so there is one hyper-step per optimizer step. ``clip_grad_norm_`` runs before ``step()``
  and CAM-HD sees the clipped gradients.
* ``save_state`` / ``load_state``: everything lives in ``optimizer.state_dict()`` (plain tensors and data,
  ``weights_only``-safe); a load hook moves the group tensors to the parameters' device and checks that the
  saved learning-rate tree matches the model.
* DDP: gradients are averaged before ``step()``; every rank computes identical α and γ. FSDP2: see
  :mod:`hf_camhd.optim.distributed` (one ``all_reduce`` per step). DeepSpeed ZeRO: not supported
  (:func:`check_accelerator` raises early; the optimizer raises at its first step otherwise).

This module adds the two things a training script wants: logging the learned rates and an early check.

    >>> import torch
    >>> from accelerate import Accelerator
    >>> from hf_camhd import CAMHDAdam
    >>> accelerator = Accelerator(cpu=True)
    >>> check_accelerator(accelerator)                      # raises under DeepSpeed
    >>> model = torch.nn.Linear(4, 2)
    >>> model, optimizer = accelerator.prepare(model, CAMHDAdam(model, lr=1e-3, levels=("global", "layer")))
    >>> stats = log_camhd_stats(accelerator, optimizer, step=0)  # accelerator.log(...) to every tracker
    >>> sorted(k for k in stats if k.startswith("camhd/gamma"))
    ['camhd/gamma_global', 'camhd/gamma_layer']
"""

from __future__ import annotations

from typing import Any

from .._extras import require
from . import unwrap_camhd

require("hf_camhd.integrations.accelerate", "accelerate")

__all__ = ["camhd_stats", "check_accelerator", "log_camhd_stats", "unwrap_camhd"]


def camhd_stats(optimizer: Any) -> dict[str, float]:
    """The CAM-HD scalars of ``optimizer`` (γ per level, mean/min/max α per level, mean effective lr) as
    plain floats; ``{}`` for a non-CAM-HD optimizer. Call on every rank (under FSDP2 it gathers sharded α)."""
    opt = unwrap_camhd(optimizer)
    return opt.lr_stats() if opt is not None else {}


def log_camhd_stats(accelerator, optimizer: Any, step: int | None = None) -> dict[str, float]:
    """``accelerator.log(camhd_stats(optimizer), step=step)`` (the trackers log on the main process only);
    returns the scalars."""
    stats = camhd_stats(optimizer)
    if stats:
        accelerator.log(stats, step=step)
    return stats


def check_accelerator(accelerator) -> None:
    """Raise a clear error for setups CAM-HD cannot support (DeepSpeed ZeRO's flattened groups) before training."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise RuntimeError("CAM-HD does not support DeepSpeed: ZeRO flattens each param group into one partition per "
                           "rank, where the block, layer, unit and parameter levels cannot exist and the global level "
                           "would be summed over one partition only. Use DDP (multi_gpu) or FSDP2 (fsdp_version=2).")
