"""Small image classifiers used in the CAM-HD experiments, loadable and shareable through the Hugging Face Hub.

``LeNet5`` and ``MLP`` are ``nn.Module`` s with :class:`huggingface_hub.PyTorchModelHubMixin`
(``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``); ``forward(pixel_values, labels=None)``
returns a ``transformers`` ``ImageClassifierOutput`` so ``transformers.Trainer`` can train them.
"""

from .._extras import require

require("hf_camhd.models", "huggingface_hub")
require("hf_camhd.models", "transformers")

from .lenet import ACTIVATIONS, LeNet5  # noqa: E402
from .mlp import MLP  # noqa: E402

__all__ = ["ACTIVATIONS", "LeNet5", "MLP"]
