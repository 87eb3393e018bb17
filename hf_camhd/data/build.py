"""Build the normalised ``pixel_values`` / ``labels`` ``datasets.Dataset`` from numpy arrays, fast."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import pyarrow as pa
from datasets import Array3D, ClassLabel, Features

from .info import ImageDatasetInfo

__all__ = ["image_features", "build_image_dataset", "to_pixel_values"]

# note: rows per Arrow chunk, so that list offsets (int32) never overflow and no single huge copy is made
_CHUNK_VALUES = 1 << 26


def image_features(shape: Sequence[int], class_names: Sequence[str]) -> Features:
    """``Features({"pixel_values": Array3D(shape, "float32"), "labels": ClassLabel(names=class_names)})``."""
    return Features(
        {
            "pixel_values": Array3D(shape=tuple(int(s) for s in shape), dtype="float32"),
            "labels": ClassLabel(names=list(class_names)),
        }
    )


def to_pixel_values(images: np.ndarray, info: ImageDatasetInfo, *, normalize: bool = True) -> np.ndarray:
    """Raw images ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` -> float32 ``(N, C, H, W)``.

    Values become ``raw / info.raw_max`` and, with ``normalize``, ``(that - mean[c]) / std[c]``.
    """
    images = np.asarray(images)
    c, h, w = info.shape
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[1:] != (c, h, w) and images.shape[3] == c:
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1:] != (c, h, w):
        raise ValueError(
            f"Images of shape {tuple(images.shape)} do not fit dataset {info.name!r}: expected (N, {h}, {w}) or "
            f"(N, {h}, {w}, {c}) or (N, {c}, {h}, {w})"
        )
    x = images.astype(np.float32)  # a fresh C-contiguous copy, edited in place below
    x /= np.float32(info.raw_max)
    if normalize:
        x -= np.asarray(info.mean, dtype=np.float32).reshape(1, c, 1, 1)
        x /= np.asarray(info.std, dtype=np.float32).reshape(1, c, 1, 1)
    return np.ascontiguousarray(x)


def _array3d_column(pixel_values: np.ndarray, features: Features) -> pa.ChunkedArray:
    """The Arrow column for ``Array3D`` storage (three nested lists of float32), built from offsets."""
    n, c, h, w = pixel_values.shape
    ext_type = features["pixel_values"]()  # datasets' Array3DExtensionType for this shape
    rows = max(1, _CHUNK_VALUES // max(1, c * h * w))
    chunks = []
    for start in range(0, n, rows):
        block = pixel_values[start : start + rows]
        m = block.shape[0]
        storage = pa.array(block.reshape(-1))
        storage = pa.ListArray.from_arrays(pa.array(np.arange(0, m * c * h * w + 1, w, dtype=np.int32)), storage)
        storage = pa.ListArray.from_arrays(pa.array(np.arange(0, m * c * h + 1, h, dtype=np.int32)), storage)
        storage = pa.ListArray.from_arrays(pa.array(np.arange(0, m * c + 1, c, dtype=np.int32)), storage)
        chunks.append(pa.ExtensionArray.from_storage(ext_type, storage))
    return pa.chunked_array(chunks, type=ext_type)


def build_image_dataset(
    pixel_values: np.ndarray,
    labels: np.ndarray | Sequence[int],
    class_names: Sequence[str],
    *,
    description: str = "",
) -> datasets.Dataset:
    """An in-memory ``datasets.Dataset`` with ``pixel_values`` (``Array3D`` float32) and ``labels`` (``ClassLabel``).

    Same result as ``Dataset.from_dict(..., features=image_features(...))`` but built straight from the
    numpy buffers (about 10x faster for 60k images). Formatted with ``.with_format("torch")``; nothing
    is written to disk.

    Example:
        >>> import numpy as np
        >>> from hf_camhd.data import build_image_dataset
        >>> ds = build_image_dataset(np.zeros((4, 1, 8, 8), np.float32), [0, 1, 2, 3], [str(i) for i in range(10)])
        >>> ds[:2]["pixel_values"].shape
        torch.Size([2, 1, 8, 8])
    """
    pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if pixel_values.ndim != 4:
        raise ValueError(f"pixel_values must be (N, C, H, W), got shape {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] != labels.shape[0]:
        raise ValueError(
            f"pixel_values and labels disagree on the number of examples: {pixel_values.shape[0]} vs {labels.shape[0]}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in [0, {len(class_names)}), got {labels.min()}..{labels.max()}")
    features = image_features(pixel_values.shape[1:], class_names)
    info = datasets.DatasetInfo(description=description, features=features)
    try:
        table = pa.table({"pixel_values": _array3d_column(pixel_values, features), "labels": pa.array(labels)})
        table = table.replace_schema_metadata(features.arrow_schema.metadata)
        dataset = datasets.Dataset(table, info=info)
        if dataset.features != features:  # pragma: no cover - guards against a datasets storage change
            raise TypeError("unexpected features")
    except Exception:  # pragma: no cover - the documented (slower) path
        dataset = datasets.Dataset.from_dict({"pixel_values": pixel_values, "labels": labels}, features=features, info=info)
    return dataset.with_format("torch")
