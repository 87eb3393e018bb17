"""Tensor-level training augmentation (random crop with padding + horizontal flip) for normalised image batches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from .info import dataset_info

__all__ = ["RandomCropFlip", "train_transform"]


class RandomCropFlip:
    """Random ``size`` x ``size`` crop of the zero-padded image, then a random horizontal flip.

    The standard CIFAR-10 training augmentation (``padding=4``, ``flip_prob=0.5``), on tensors: it takes
    a batch ``(B, C, H, W)`` or a single image ``(C, H, W)`` and draws one crop offset and one flip per
    image from ``generator`` (a seeded :class:`torch.Generator` makes it reproducible; ``None`` uses
    torch's global generator). It runs on the device of the input.

    The padding value is ``fill`` in the *normalised* space, so the default 0.0 pads with the
    dataset mean colour (torchvision pads the raw image with black before normalising; pass
    ``fill=-mean/std`` per channel as a tensor of shape ``(C,)`` to copy that exactly).

    Example:
        >>> import torch
        >>> from hf_camhd.data import RandomCropFlip
        >>> augment = RandomCropFlip(32, padding=4, generator=torch.Generator().manual_seed(0))
        >>> augment(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(
        self,
        size: int = 32,
        padding: int = 4,
        flip_prob: float = 0.5,
        *,
        fill: float | torch.Tensor = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"Invalid size: {size}")
        if padding < 0:
            raise ValueError(f"Invalid padding: {padding}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"Invalid flip_prob: {flip_prob}")
        self.size = size
        self.padding = padding
        self.flip_prob = flip_prob
        self.fill = fill
        self.generator = generator

    def __repr__(self) -> str:
        return f"RandomCropFlip(size={self.size}, padding={self.padding}, flip_prob={self.flip_prob})"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        single = images.dim() == 3
        if single:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise ValueError(f"RandomCropFlip expects (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
        b, c, h, w = images.shape
        p, s = self.padding, self.size
        if h + 2 * p < s or w + 2 * p < s:
            raise ValueError(f"Cannot crop {s}x{s} from {h}x{w} images padded by {p}")
        padded = self._pad(images)
        # note: draw on the CPU generator, then move: same numbers whatever the device of the images
        oy = torch.randint(0, h + 2 * p - s + 1, (b,), generator=self.generator)
        ox = torch.randint(0, w + 2 * p - s + 1, (b,), generator=self.generator)
        flip = torch.rand(b, generator=self.generator) < self.flip_prob
        ar = torch.arange(s)
        rows = (oy[:, None] + ar).to(images.device)  # (B, s)
        cols = ox[:, None] + ar  # (B, s)
        cols = torch.where(flip[:, None], cols.flip(1), cols).to(images.device)
        batch = torch.arange(b, device=images.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, s, s, C)
        out = out.permute(0, 3, 1, 2).contiguous()
        return out[0] if single else out

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        p = self.padding
        if p == 0:
            return images
        if isinstance(self.fill, torch.Tensor):
            fill = self.fill.to(device=images.device, dtype=images.dtype).reshape(1, -1, 1, 1)
            out = fill.expand(images.shape[0], images.shape[1], images.shape[2] + 2 * p, images.shape[3] + 2 * p)
            out = out.clone()
            out[:, :, p:-p, p:-p] = images
            return out
        return F.pad(images, (p, p, p, p), value=float(self.fill))


def train_transform(name: str, *, generator: torch.Generator | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The standard training augmentation of dataset ``name`` as a batch-tensor callable, or ``None``.

    ``cifar10`` gets ``RandomCropFlip(32, padding=4, flip_prob=0.5)``; the digit datasets (digits,
    MNIST, SVHN) and Fashion-MNIST are trained without augmentation, as in the CAM-HD experiments.
    Apply it to the training batches only, e.g. ``as_dataloader(ds["train"], transform=...)``.
    """
    info = dataset_info(name)
    if info.name == "cifar10":
        return RandomCropFlip(info.image_size, padding=4, flip_prob=0.5, generator=generator)
    return None
