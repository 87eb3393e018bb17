"""Build the comparison's model (MLP, LeNet-5, timm ResNet-18/34) for a dataset, and read logits from its output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from ..data import ImageDatasetInfo

__all__ = ["MODELS", "build_model", "logits_of"]

MODELS = ("mlp", "lenet5", "resnet18", "resnet34")


def build_model(name: str, info: ImageDatasetInfo, model_kwargs: Mapping[str, Any] | None = None, *,
                cifar_stem: bool = True) -> nn.Module:
    """A freshly initialised ``name`` model for images shaped like dataset ``info`` (seed torch first).

    * ``mlp``: :class:`hf_camhd.models.MLP` over ``C·H·W`` inputs (``model_kwargs["hidden_sizes"]``).
    * ``lenet5``: :class:`hf_camhd.models.LeNet5` (its padding adapts to 8, 28 or 32 pixel images).
    * ``resnet18`` / ``resnet34``: ``timm.create_model(name, pretrained=False, num_classes=...)``. With
      ``cifar_stem`` (default) the 7x7 stride-2 stem convolution becomes a 3x3 stride-1 one and the
      max-pool is removed — the usual CIFAR ResNet (He et al. 2016, §4.2; kuangliu/pytorch-cifar), so
      32x32 inputs keep a 4x4 map before the global pool instead of 1x1.
    """
    from ..models import MLP, LeNet5  # note: here, so that MODELS (for `hf-camhd --help`) imports no model stack

    key = name.strip().lower().replace("-", "")
    kwargs = dict(model_kwargs or {})
    if key == "mlp":
        hidden = kwargs.pop("hidden_sizes", (100, 100, 100))
        return MLP(input_size=info.num_channels * info.image_size * info.image_size,
                   hidden_sizes=list(hidden), num_classes=info.num_classes, **kwargs)
    if key in ("lenet5", "lenet"):
        return LeNet5(in_channels=info.num_channels, image_size=info.image_size, num_classes=info.num_classes,
                      **kwargs)
    if key in ("resnet18", "resnet34"):
        import timm

        model = timm.create_model(key, pretrained=False, num_classes=info.num_classes,
                                  in_chans=info.num_channels, **kwargs)
        if cifar_stem:
            # note: the CIFAR stem; the new conv is initialised as timm initialises its convs (kaiming normal)
            conv = nn.Conv2d(info.num_channels, model.conv1.out_channels, kernel_size=3, stride=1, padding=1,
                             bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            model.conv1 = conv
            model.maxpool = nn.Identity()
        return model
    raise ValueError(f"Unknown model {name!r}; expected one of {', '.join(MODELS)}")


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: ``output.logits`` (our models, transformers) or the tensor itself (timm)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None:
        raise TypeError(f"Cannot read logits from a model output of type {type(output).__name__}")
    return logits
