"""A fully connected (multi-layer perceptron) image classifier, the feed-forward net of the CAM-HD MNIST runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from .lenet import _HUB_MIXIN_KWARGS, _check_positive_int, _classification_output, _make_activation

__all__ = ["MLP"]


class MLP(nn.Module, PyTorchModelHubMixin, **_HUB_MIXIN_KWARGS):
    r"""A multi-layer perceptron over flattened images, with the Hugging Face Hub mixin.

    Architecture (``layers`` is an ``nn.ModuleList`` of the hidden linears, ``head`` the output linear;
    the activation holds no parameters)::

        flatten pixel_values to (batch, input_size)
        layers[0]  Linear(input_size     -> hidden_sizes[0]) -> act
        layers[i]  Linear(hidden_sizes[i-1] -> hidden_sizes[i]) -> act
        head       Linear(hidden_sizes[-1] -> num_classes)          (logits)

    ``hidden_sizes=[]`` gives multinomial logistic regression (``head`` only).

    Args:
        input_size: number of input features after flattening (784 for 28x28 MNIST, 64 for 8x8 digits).
        hidden_sizes: widths of the hidden layers, e.g. ``[100, 100, 100]`` or ``[1000, 1000]``.
        num_classes: number of output logits.
        activation: ``"relu"`` (default) or ``"tanh"``.

    ``forward(pixel_values, labels=None)`` flattens every dimension after the batch one and returns a
    :class:`transformers.modeling_outputs.ImageClassifierOutput` (``logits``; ``loss`` = mean cross
    entropy when ``labels`` is given, else ``None``). ``save_pretrained`` / ``from_pretrained`` /
    ``push_to_hub`` come from :class:`huggingface_hub.PyTorchModelHubMixin`.

    Example:
        >>> import torch
        >>> from hf_camhd.models import MLP
        >>> model = MLP(input_size=784, hidden_sizes=[100, 100], num_classes=10)
        >>> out = model(torch.randn(8, 1, 28, 28))
        >>> out.logits.shape, out.loss is None
        (torch.Size([8, 10]), True)
        >>> model.block_names()
        ['layers.0', 'layers.1', 'head']
    """

    main_input_name = "pixel_values"

    def __init__(
        self,
        input_size: int = 784,
        hidden_sizes: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        _check_positive_int("input_size", input_size)
        _check_positive_int("num_classes", num_classes)
        if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
            raise ValueError(f"Invalid hidden_sizes: must be a list of positive ints, got {hidden_sizes!r}")
        for width in hidden_sizes:
            _check_positive_int("hidden_sizes entry", width)
        self.input_size = input_size
        self.hidden_sizes = list(hidden_sizes)
        self.num_classes = num_classes

        widths = [input_size, *self.hidden_sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)
        self.act = _make_activation(activation)

    def block_names(self) -> list[str]:
        """Names of the submodules that hold parameters, input to output (one block each)."""
        return [f"layers.{i}" for i in range(len(self.layers))] + ["head"]

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        """Classify a batch ``pixel_values`` of shape (batch, ...) with ``input_size`` values per example."""
        x = pixel_values.reshape(pixel_values.shape[0], -1)
        if x.shape[1] != self.input_size:
            raise ValueError(
                f"MLP expected {self.input_size} input features per example, got pixel_values of shape "
                f"{tuple(pixel_values.shape)} ({x.shape[1]} features); set input_size={x.shape[1]}"
            )
        for layer in self.layers:
            x = self.act(layer(x))
        return _classification_output(self.head(x), labels)
