"""Turn a loaded split into full tensors or a fast ``DataLoader`` of ``{"pixel_values", "labels"}`` batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["as_tensors", "TensorImageDataset", "as_dataloader"]


def as_tensors(split: datasets.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``split`` as ``(pixel_values, labels)``: float32 ``(N, C, H, W)`` and int64 ``(N,)`` tensors.

    Faster than a ``DataLoader`` over the Arrow table when the data fits in memory (every dataset of
    :func:`~hf_camhd.data.load_image_dataset` does).

    Example:
        >>> from hf_camhd.data import load_image_dataset, as_tensors
        >>> X, y = as_tensors(load_image_dataset("digits")["train"])
        >>> X.shape, y.dtype
        (torch.Size([1438, 1, 8, 8]), torch.int64)
    """
    batch = split.with_format("torch", columns=["pixel_values", "labels"])[:]
    pixel_values = batch["pixel_values"]
    if not isinstance(pixel_values, torch.Tensor):  # ragged storage comes back as a list
        pixel_values = torch.stack(list(pixel_values))
    return pixel_values.to(torch.float32), batch["labels"].to(torch.int64)


class TensorImageDataset(Dataset):
    """A map-style dataset of ``{"pixel_values": (C, H, W), "labels": int64}`` items held in tensors.

    ``transform`` (a batch-tensor callable such as :class:`~hf_camhd.data.RandomCropFlip`) is applied on
    the fly. ``DataLoader`` fetches a whole batch through ``__getitems__``, so the transform runs once per
    batch, vectorised. Works as ``train_dataset`` of ``transformers.Trainer`` (its default collator stacks
    the items). A seeded transform is reproducible with ``num_workers=0``.
    """

    def __init__(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if pixel_values.shape[0] != labels.shape[0]:
            raise ValueError(
                f"pixel_values and labels disagree on the number of examples: {pixel_values.shape[0]} vs {labels.shape[0]}"
            )
        self.pixel_values = pixel_values
        self.labels = labels
        self.transform = transform

    @classmethod
    def from_split(
        cls, split: datasets.Dataset, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> "TensorImageDataset":
        """Build from a split of :func:`~hf_camhd.data.load_image_dataset` (see :func:`as_tensors`)."""
        return cls(*as_tensors(split), transform=transform)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        pixel_values = self.pixel_values[index]
        if self.transform is not None:
            pixel_values = self.transform(pixel_values)
        labels = self.labels[index]
        return [{"pixel_values": x, "labels": y} for x, y in zip(pixel_values, labels)]


def as_dataloader(
    split: datasets.Dataset | TensorImageDataset,
    batch_size: int = 128,
    *,
    shuffle: bool = False,
    seed: int | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A ``DataLoader`` of ``{"pixel_values": (B, C, H, W), "labels": (B,)}`` batches, ready for ``model(**batch)``.

    The split is copied into tensors first (:class:`TensorImageDataset`). ``seed`` fixes the shuffle order;
    ``transform`` is a batch-tensor augmentation (use it for the training split only, e.g.
    ``train_transform("cifar10")``).

    Example:
        >>> from hf_camhd.data import load_image_dataset, as_dataloader
        >>> loader = as_dataloader(load_image_dataset("digits")["train"], 64, shuffle=True, seed=0)
        >>> batch = next(iter(loader))
        >>> batch["pixel_values"].shape, batch["labels"].shape
        (torch.Size([64, 1, 8, 8]), torch.Size([64]))
    """
    if isinstance(split, TensorImageDataset):
        dataset = split if transform is None else TensorImageDataset(split.pixel_values, split.labels, transform)
    else:
        dataset = TensorImageDataset.from_split(split, transform=transform)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=num_workers,
    )
