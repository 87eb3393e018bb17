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

from importlib import import_module

# note: attributes load their submodule on first use (PEP 562), so `hf_camhd.data.info` / `list_datasets` (what
# `hf-camhd --help` shows) import neither `datasets` nor numpy; the rest needs the `hf` extra
_LAZY = {
    "build_image_dataset": "build", "image_features": "build", "to_pixel_values": "build",
    "find_idx_files": "idx", "read_idx": "idx",
    "DATASETS": "info", "ImageDatasetInfo": "info", "dataset_info": "info", "list_datasets": "info",
    "SPLITS": "loading", "DatasetUnavailableError": "loading", "load_image_dataset": "loading",
    "TensorImageDataset": "tensors", "as_dataloader": "tensors", "as_tensors": "tensors",
    "RandomCropFlip": "transforms", "train_transform": "transforms",
}
_NEEDS = {"build": "datasets", "idx": "numpy", "loading": "datasets", "tensors": "datasets"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _LAZY[name]
    if module in _NEEDS:
        from .._extras import require

        require("hf_camhd.data", _NEEDS[module], extra="hf")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
