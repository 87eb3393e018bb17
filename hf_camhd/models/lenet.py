"""LeNet-5, the small convolutional classifier of the CAM-HD LeNet experiments (MNIST, CIFAR-10, SVHN)."""

from __future__ import annotations

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import ImageClassifierOutput

__all__ = ["LeNet5", "ACTIVATIONS"]

#: Parameter-free activations accepted by the ``activation`` argument of the models in ``hf_camhd.models``.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}

# note: PyTorchModelHubMixin class kwargs shared by every model in hf_camhd.models (they go into the model card)
_HUB_MIXIN_KWARGS = dict(
    library_name="hf_camhd",
    tags=["camhd", "image-classification"],
    license="apache-2.0",
    pipeline_tag="image-classification",
)


def _make_activation(activation: str) -> nn.Module:
    """A fresh, parameter-free activation module for ``activation`` ("relu" or "tanh")."""
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"Invalid activation: {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activation]()


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: must be a positive int, got {value!r}")


def _classification_output(logits: torch.Tensor, labels: torch.Tensor | None) -> ImageClassifierOutput:
    """``ImageClassifierOutput(loss, logits)``; ``loss`` is the mean cross entropy when labels are given, else None."""
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits, labels.to(device=logits.device, dtype=torch.long).reshape(-1))
    return ImageClassifierOutput(loss=loss, logits=logits)


def _conv_out(size: int, kernel: int, padding: int) -> int:
    return size + 2 * padding - kernel + 1


class LeNet5(nn.Module, PyTorchModelHubMixin, **_HUB_MIXIN_KWARGS):
    r"""LeNet-5 (LeCun et al., 1998) for small images, with the Hugging Face Hub mixin.

    Architecture (every stage with parameters is one named submodule, so a hierarchy builder can map
    one block per stage; activations and pools hold no parameters)::

        conv1  Conv2d(in_channels -> 6, 5x5, padding=p1) -> act -> pool (max 2x2)
        conv2  Conv2d(6 -> 16, 5x5, padding=p2)          -> act -> pool (max 2x2)
        flatten (16 * s * s)
        fc1    Linear(16*s*s -> 120) -> act
        fc2    Linear(120 -> 84)     -> act
        fc3    Linear(84 -> num_classes)                  (logits)

    Padding follows the classic recipe: 32x32 inputs (CIFAR-10, SVHN) use no padding and 28x28 inputs
    (MNIST, Fashion-MNIST) pad the first convolution by 2, so both reach ``s = 5`` (400 features into
    ``fc1``). Smaller inputs (8x8 scikit-learn digits) also pad the second convolution by 2
    (8 -> 8 -> 4 -> 4 -> 2, ``s = 2``). Pass ``conv1_padding`` / ``conv2_padding`` to override; the
    flattened size is always computed from ``image_size``.

    Args:
        in_channels: 1 (grey) or 3 (RGB) input channels.
        image_size: side of the square input images (8, 28, 32, ...).
        num_classes: number of output logits.
        activation: ``"relu"`` (default) or ``"tanh"`` (the original LeNet).
        conv1_padding: padding of ``conv1``; ``None`` = 2 if ``image_size < 32`` else 0.
        conv2_padding: padding of ``conv2``; ``None`` = 0 if the map entering it is at least 10 wide, else 2.

    ``forward(pixel_values, labels=None)`` returns a
    :class:`transformers.modeling_outputs.ImageClassifierOutput` with ``logits`` (batch x num_classes)
    and ``loss`` (mean cross entropy if ``labels`` is given, else ``None``), so ``transformers.Trainer``
    can train it. ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` come from
    :class:`huggingface_hub.PyTorchModelHubMixin` (the ``__init__`` arguments are the config).

    Example:
        >>> import torch
        >>> from hf_camhd.models import LeNet5
        >>> model = LeNet5(in_channels=1, image_size=28, num_classes=10)
        >>> out = model(torch.randn(4, 1, 28, 28), labels=torch.tensor([0, 1, 2, 3]))
        >>> out.logits.shape, out.loss.ndim
        (torch.Size([4, 10]), 0)
        >>> model.block_names()
        ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
    """

    main_input_name = "pixel_values"

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        activation: str = "relu",
        conv1_padding: int | None = None,
        conv2_padding: int | None = None,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("image_size", image_size)
        _check_positive_int("num_classes", num_classes)
        if conv1_padding is None:
            conv1_padding = 2 if image_size < 32 else 0
        size = _conv_out(image_size, 5, conv1_padding) // 2
        if conv2_padding is None:
            # note: a 5x5 conv needs >= 5 pixels; below 10 it would leave less than 3 after the pool, so pad
            conv2_padding = 0 if size >= 10 else 2
        size = _conv_out(size, 5, conv2_padding) // 2
        if size < 1:
            raise ValueError(
                f"Invalid image_size: {image_size} is too small for LeNet5 with conv1_padding={conv1_padding}, "
                f"conv2_padding={conv2_padding} (the feature map vanishes); increase the paddings"
            )
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.feature_size = size  # side of the 16-channel map entering fc1

        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=conv1_padding)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, padding=conv2_padding)
        self.fc1 = nn.Linear(16 * size * size, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.act = _make_activation(activation)
        self.pool = nn.MaxPool2d(2)

    def block_names(self) -> list[str]:
        """Names of the submodules that hold parameters, input to output (one block each)."""
        return ["conv1", "conv2", "fc1", "fc2", "fc3"]

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        """Classify a batch ``pixel_values`` of shape (batch, in_channels, image_size, image_size)."""
        x = self.pool(self.act(self.conv1(pixel_values)))
        x = self.pool(self.act(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return _classification_output(self.fc3(x), labels)
