"""Image-classification datasets for the CAM-HD experiments as ``datasets.DatasetDict`` s of normalised tensors.

``load_image_dataset(name)`` gives ``{"train", "test"}`` splits with ``pixel_values`` (float32, C x H x W)
and ``labels`` (``ClassLabel``), formatted for torch. Names: ``digits`` (scikit-learn, offline),
``mnist``, ``fashion_mnist`` (also from the Debian package ``dataset-fashion-mnist``), ``cifar10``, ``svhn``.

Example:
    >>> from hf_camhd.data import load_image_dataset, as_tensors, dataset_info
    >>> ds = load_image_dataset("digits")
    >>> X, y = as_tensors(ds["train"])
    >>> X.shape, dataset_info("digits").num_classes
    (torch.Size([1438, 1, 8, 8]), 10)
"""

from .build import build_image_dataset, image_features, to_pixel_values
from .idx import find_idx_files, read_idx
from .info import DATASETS, ImageDatasetInfo, dataset_info, list_datasets
from .loading import SPLITS, DatasetUnavailableError, load_image_dataset
from .tensors import TensorImageDataset, as_dataloader, as_tensors
from .transforms import RandomCropFlip, train_transform

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetUnavailableError",
    "ImageDatasetInfo",
    "RandomCropFlip",
    "TensorImageDataset",
    "as_dataloader",
    "as_tensors",
    "build_image_dataset",
    "dataset_info",
    "find_idx_files",
    "image_features",
    "list_datasets",
    "load_image_dataset",
    "read_idx",
    "to_pixel_values",
    "train_transform",
]
