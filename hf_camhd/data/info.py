"""What each supported image dataset looks like: channels, size, classes, normalisation and where to get it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ImageDatasetInfo", "DATASETS", "dataset_info", "list_datasets"]

_DIGIT_NAMES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class ImageDatasetInfo:
    """Facts about one image-classification dataset.

    ``pixel_values`` produced by :func:`hf_camhd.data.load_image_dataset` are
    ``(raw / raw_max - mean[c]) / std[c]`` for channel ``c``, shape ``(num_channels, image_size, image_size)``.

    Attributes:
        name: the name :func:`~hf_camhd.data.load_image_dataset` takes (``"fashion_mnist"``).
        num_channels: 1 (grey) or 3 (RGB).
        image_size: side of the square images in pixels.
        class_names: label names, index = label.
        mean, std: per-channel normalisation statistics of the training split, on the 0..1 scale.
        raw_max: the value of a white pixel in the raw data (255 for 8-bit images, 16 for sklearn digits).
        train_size, test_size: number of examples in the standard splits.
        hub_id, hub_config: the Hugging Face Hub dataset (``None`` where there is none).
        system_dir: folder a system package installs the data into (IDX files), if any.
        install_hint: how to get the data without a ``data_dir``.
    """

    name: str
    num_channels: int
    image_size: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    raw_max: float
    train_size: int
    test_size: int
    hub_id: str | None = None
    hub_config: str | None = None
    system_dir: Path | None = None
    install_hint: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(num_channels, image_size, image_size)``, the shape of one ``pixel_values`` entry."""
        return (self.num_channels, self.image_size, self.image_size)


DATASETS: dict[str, ImageDatasetInfo] = {
    info.name: info
    for info in (
        ImageDatasetInfo(
            name="digits",
            num_channels=1,
            image_size=8,
            class_names=_DIGIT_NAMES,
            # note: statistics of the 80% train split (seed 0) of sklearn's digits after dividing by 16;
            # tests/test_data.py recomputes them
            mean=(0.3049,),
            std=(0.3759,),
            raw_max=16.0,
            train_size=1438,
            test_size=359,
            install_hint="bundled with scikit-learn (pip install scikit-learn); no download needed",
        ),
        ImageDatasetInfo(
            name="mnist",
            num_channels=1,
            image_size=28,
            class_names=_DIGIT_NAMES,
            mean=(0.1307,),
            std=(0.3081,),
            raw_max=255.0,
            train_size=60000,
            test_size=10000,
            hub_id="ylecun/mnist",
            install_hint="the Hub dataset 'ylecun/mnist' (needs network once; then the HF cache is used)",
        ),
        ImageDatasetInfo(
            name="fashion_mnist",
            num_channels=1,
            image_size=28,
            class_names=(
                "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
            ),
            mean=(0.2860,),
            std=(0.3530,),
            raw_max=255.0,
            train_size=60000,
            test_size=10000,
            hub_id="zalando-datasets/fashion_mnist",
            system_dir=Path("/usr/share/datasets/fashion-mnist"),
            install_hint=(
                "apt-get install dataset-fashion-mnist (Debian/Ubuntu; IDX files in /usr/share/datasets/fashion-mnist), "
                "or the Hub dataset 'zalando-datasets/fashion_mnist' (needs network once)"
            ),
        ),
        ImageDatasetInfo(
            name="cifar10",
            num_channels=3,
            image_size=32,
            class_names=(
                "airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck",
            ),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2470, 0.2435, 0.2616),
            raw_max=255.0,
            train_size=50000,
            test_size=10000,
            hub_id="uoft-cs/cifar10",
            install_hint="the Hub dataset 'uoft-cs/cifar10' (needs network once; then the HF cache is used)",
        ),
        ImageDatasetInfo(
            name="svhn",
            num_channels=3,
            image_size=32,
            class_names=_DIGIT_NAMES,
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
            raw_max=255.0,
            train_size=73257,
            test_size=26032,
            hub_id="ufldl-stanford/svhn",
            hub_config="cropped_digits",
            install_hint=(
                "the Hub dataset 'ufldl-stanford/svhn', config 'cropped_digits' (needs network once; then the HF "
                "cache is used)"
            ),
        ),
    )
}


def _canonical_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return key


def list_datasets() -> list[str]:
    """Names accepted by :func:`dataset_info` and :func:`~hf_camhd.data.load_image_dataset`."""
    return list(DATASETS)


def dataset_info(name: str) -> ImageDatasetInfo:
    """The :class:`ImageDatasetInfo` of ``name`` (case-insensitive; ``-`` and ``_`` are the same).

    Example:
        >>> from hf_camhd.data import dataset_info
        >>> info = dataset_info("cifar10")
        >>> info.shape, info.num_classes, info.mean
        ((3, 32, 32), 10, (0.4914, 0.4822, 0.4465))
    """
    return DATASETS[_canonical_name(name)]
