"""Load an image-classification dataset from a local folder, a system package, scikit-learn or the HF Hub."""

from __future__ import annotations

import io
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .build import build_image_dataset, image_features, to_pixel_values
from .idx import find_idx_files, read_idx
from .info import ImageDatasetInfo, dataset_info

__all__ = ["DatasetUnavailableError", "load_image_dataset", "SPLITS"]

SPLITS = ("train", "test")
_IMAGE_COLUMNS = ("image", "img", "images")
_LABEL_COLUMNS = ("label", "labels", "fine_label")
_FOLDER_KINDS = "a save_to_disk folder, train/test parquet files, or MNIST-style IDX files"


class DatasetUnavailableError(RuntimeError):
    """The dataset is not on this machine and could not be fetched; the message says how to get it."""


def load_image_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    split: str | None = None,
    normalize: bool = True,
    max_samples: int | None = None,
    seed: int = 0,
    use_hub: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict | datasets.Dataset:
    """Load dataset ``name`` as ``{"train", "test"}`` splits of normalised ``pixel_values`` and ``labels``.

    Every split has two columns, formatted with ``.with_format("torch")``:
    ``pixel_values`` (``Array3D`` float32, ``(C, H, W)``, ``(raw / raw_max - mean) / std`` per channel)
    and ``labels`` (``ClassLabel`` with the dataset's class names). See :func:`dataset_info`.

    Sources, in order (the first that applies is used; nothing is cached outside ``cache_dir`` /
    ``data_dir``):

    1. ``data_dir``, when given (and then nothing else is tried): a ``save_to_disk`` folder (a
       ``DatasetDict``, or ``train/`` and ``test/`` saved ``Dataset`` s), ``*.parquet`` files whose
       names or parent folders start with ``train`` / ``test`` (the Hub's parquet layout works), or IDX
       files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-...``). Data
       with a ``pixel_values`` column is taken as already processed and returned as stored; data with
       an ``image`` / ``img`` column and a ``label`` column is decoded and normalised.
    2. ``digits``: scikit-learn's bundled 8x8 digits (no download), split 80/20 with ``seed``.
    3. ``fashion_mnist``: the IDX files of the Debian package ``dataset-fashion-mnist``
       (``/usr/share/datasets/fashion-mnist``), if installed.
    4. with ``use_hub``: the Hub dataset (``ylecun/mnist``, ``zalando-datasets/fashion_mnist``,
       ``uoft-cs/cifar10``, ``ufldl-stanford/svhn`` config ``cropped_digits``) through
       ``datasets.load_dataset`` and the standard HF cache (``cache_dir`` overrides it). This needs the
       network the first time; with ``HF_HUB_OFFLINE=1`` only the cache is read.

    Args:
        name: ``digits``, ``mnist``, ``fashion_mnist``, ``cifar10`` or ``svhn``.
        data_dir: a local folder holding the data (see above).
        split: ``None`` for a ``DatasetDict`` with both splits, or ``"train"`` / ``"test"`` for one ``Dataset``.
        normalize: standardise with the dataset's mean/std (``False``: only scale to 0..1).
        max_samples: keep only the first ``max_samples`` examples of each split (quick runs).
        seed: seed of the digits train/test split (other datasets have an official split).
        use_hub: try the Hugging Face Hub (and its cache) as the last source.
        cache_dir: HF datasets cache for the Hub source.

    Raises:
        DatasetUnavailableError: no source has the data; the message says how to get it.
        ValueError: unknown ``name`` / ``split``, or data of the wrong shape in ``data_dir``.

    Example:
        >>> from hf_camhd.data import load_image_dataset
        >>> ds = load_image_dataset("digits")
        >>> ds["train"].num_rows, ds["test"].num_rows, ds["train"][:2]["pixel_values"].shape
        (1438, 359, torch.Size([2, 1, 8, 8]))
    """
    info = dataset_info(name)
    if split is not None and split not in SPLITS:
        raise ValueError(f"Invalid split: {split!r}; expected one of {', '.join(SPLITS)} or None for both")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"Invalid max_samples: must be a positive int or None, got {max_samples!r}")
    wanted = SPLITS if split is None else (split,)

    splits = _resolve(info, wanted, data_dir=data_dir, seed=seed, use_hub=use_hub, cache_dir=cache_dir,
                      normalize=normalize, max_samples=max_samples)
    result = datasets.DatasetDict({s: splits[s] for s in wanted})
    return result[split] if split is not None else result


# --------------------------------------------------------------------------------------------- sources


def _resolve(info, wanted, *, data_dir, seed, use_hub, cache_dir, normalize, max_samples):
    """Try the sources in order; return ``{split: processed Dataset}`` or raise DatasetUnavailableError."""
    convert = dict(info=info, normalize=normalize, max_samples=max_samples)
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DatasetUnavailableError(
                f"Dataset {info.name!r}: data_dir {str(folder)!r} does not exist or is not a folder. "
                f"Pass data_dir= pointing to {_FOLDER_KINDS}; without data_dir, {info.name} comes from "
                f"{info.install_hint}."
            )
        splits = _load_folder(folder, wanted, **convert)
        if splits is None:
            raise DatasetUnavailableError(
                f"Dataset {info.name!r}: data_dir {str(folder)!r} holds none of {_FOLDER_KINDS} "
                f"with the split(s) {', '.join(wanted)}. Without data_dir, {info.name} comes from {info.install_hint}."
            )
        return splits

    if info.name == "digits":
        return _load_digits(info, wanted, seed=seed, normalize=normalize, max_samples=max_samples)

    tried = []
    if info.system_dir is not None:
        if find_idx_files(info.system_dir):
            splits = _load_folder(info.system_dir, wanted, **convert)
            if splits is not None:
                return splits
            tried.append(f"{info.system_dir} (incomplete: the split(s) {', '.join(wanted)} are missing)")
        else:
            tried.append(f"{info.system_dir} (not found)")

    if use_hub and info.hub_id is not None:
        try:
            raw = datasets.load_dataset(info.hub_id, info.hub_config, cache_dir=cache_dir)
        except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, HTTP errors)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            tried.append(f"the Hub dataset {info.hub_id!r} (needs network or the HF cache; {type(exc).__name__}: {reason})")
        else:
            missing = [s for s in wanted if s not in raw]
            if missing:
                tried.append(f"the Hub dataset {info.hub_id!r} (no split(s) {', '.join(missing)})")
            else:
                source = f"the Hub dataset {info.hub_id}"
                return {s: _convert_split(raw[s], source=source, **convert) for s in wanted}
    elif info.hub_id is not None:
        tried.append(f"the Hub dataset {info.hub_id!r} (skipped: use_hub=False)")

    raise DatasetUnavailableError(
        f"Dataset {info.name!r} is not available. Tried: {'; '.join(tried)}. Get it with: {info.install_hint}; "
        f"or pass data_dir= pointing to {_FOLDER_KINDS}."
    )


def _load_digits(info: ImageDatasetInfo, wanted, *, seed: int, normalize: bool, max_samples: int | None):
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise DatasetUnavailableError(f"Dataset 'digits' needs scikit-learn: {info.install_hint}") from None
    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = round(0.2 * len(labels))
    index = {"train": np.sort(order[n_test:]), "test": np.sort(order[:n_test])}
    out = {}
    for s in wanted:
        idx = index[s][:max_samples]
        pixel_values = to_pixel_values(images[idx], info, normalize=normalize)
        out[s] = build_image_dataset(pixel_values, labels[idx], info.class_names,
                                     description=f"digits ({s}) from scikit-learn, split seed {seed}")
    return out


def _load_folder(folder: Path, wanted, *, info, normalize, max_samples):
    """``{split: processed Dataset}`` from a local folder, or ``None`` when it holds no usable data."""
    convert = dict(info=info, normalize=normalize, max_samples=max_samples)
    source = str(folder)
    # 1. save_to_disk output: a DatasetDict, or one saved Dataset per split folder
    if (folder / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(folder))
        if isinstance(saved, datasets.DatasetDict) and all(s in saved for s in wanted):
            return {s: _convert_split(saved[s], source=source, **convert) for s in wanted}
    if all((folder / s / "state.json").is_file() for s in wanted):
        return {s: _convert_split(datasets.load_from_disk(str(folder / s)), source=source, **convert) for s in wanted}
    # 2. parquet files
    parquet = _find_parquet(folder)
    if all(parquet.get(s) for s in wanted):
        out = {}
        for s in wanted:
            table = pa.concat_tables([pq.read_table(p) for p in parquet[s]], promote_options="default")
            out[s] = _convert_split(datasets.Dataset(table), source=source, **convert)
        return out
    # 3. IDX files
    idx = find_idx_files(folder)
    if all(s in idx for s in wanted):
        out = {}
        for s in wanted:
            images = read_idx(idx[s]["images"])
            labels = read_idx(idx[s]["labels"]).astype(np.int64)
            if images.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"IDX files of split {s!r} in {source!r} disagree: {images.shape[0]} images, {labels.shape[0]} "
                    "labels; the images and labels files must come from the same split of one dataset"
                )
            images, labels = images[:max_samples], labels[:max_samples]
            try:
                out[s] = build_image_dataset(to_pixel_values(images, info, normalize=normalize), labels,
                                             info.class_names, description=f"{info.name} ({s}) from IDX files in {source}")
            except ValueError as err:  # wrong image size or label range: name the files and the dataset they should be
                raise ValueError(f"IDX files {idx[s]['images'].name} / {idx[s]['labels'].name} in {source!r} do not "
                                 f"hold {info.name}: {err}; point data_dir at the {info.name} files") from None
        return out
    return None


def _find_parquet(folder: Path) -> dict[str, list[Path]]:
    """Parquet files under ``folder`` by split: the file name or a parent folder starts with the split name."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*.parquet")):
        parts = [path.stem, *(p.name for p in path.relative_to(folder).parents if p.name)]
        for s in SPLITS:
            if any(part.lower().startswith(s) for part in parts):
                found.setdefault(s, []).append(path)
                break
    return found


# --------------------------------------------------------------------------------------------- conversion


def _convert_split(ds: datasets.Dataset, *, info: ImageDatasetInfo, normalize: bool, max_samples: int | None,
                   source: str) -> datasets.Dataset:
    """A loaded split (processed ``pixel_values`` or raw ``image`` + ``label``) -> the processed format."""
    if max_samples is not None and ds.num_rows > max_samples:
        ds = ds.select(range(max_samples))
    if "pixel_values" in ds.column_names:
        return _convert_processed(ds, info, source)
    image_col = next((c for c in _IMAGE_COLUMNS if c in ds.column_names), None)
    if image_col is None:
        image_col = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((c for c in _LABEL_COLUMNS if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise ValueError(
            f"Cannot read dataset {info.name!r} from {source}: expected a 'pixel_values' column, or an image column "
            f"({'/'.join(_IMAGE_COLUMNS)}) and a label column ({'/'.join(_LABEL_COLUMNS)}); found {ds.column_names}"
        )
    table = ds.with_format("arrow")[:]  # honours any indices mapping; reads no Python objects yet
    images = _decode_images(table.column(image_col), info)
    labels = np.asarray(table.column(label_col).to_numpy(zero_copy_only=False), dtype=np.int64)
    return build_image_dataset(to_pixel_values(images, info, normalize=normalize), labels, info.class_names,
                               description=f"{info.name} from {source}")


def _convert_processed(ds: datasets.Dataset, info: ImageDatasetInfo, source: str) -> datasets.Dataset:
    if "labels" not in ds.column_names:
        raise ValueError(f"Cannot read dataset {info.name!r} from {source}: 'pixel_values' without a 'labels' column")
    ds = ds.select_columns(["pixel_values", "labels"])
    expected = image_features(info.shape, info.class_names)
    feature = ds.features["pixel_values"]
    if ds.features == expected:
        return ds.with_format("torch")
    if isinstance(feature, datasets.Array3D) and tuple(feature.shape) != info.shape:
        raise ValueError(f"Dataset {info.name!r} from {source} has pixel_values of shape {feature.shape}, expected {info.shape}")
    # note: other storages (nested lists, another dtype, plain int labels) are rebuilt in memory
    arrays = ds.with_format("numpy")[:]
    pixel_values = np.asarray(arrays["pixel_values"], dtype=np.float32)
    if pixel_values.shape[1:] != info.shape:
        raise ValueError(
            f"Dataset {info.name!r} from {source} has pixel_values of shape {pixel_values.shape[1:]}, expected {info.shape}"
        )
    return build_image_dataset(pixel_values, arrays["labels"], info.class_names, description=f"{info.name} from {source}")


def _decode_images(column: pa.ChunkedArray, info: ImageDatasetInfo) -> np.ndarray:
    """An Arrow image column (``datasets.Image`` storage: struct of bytes/path, or nested lists) -> uint8 numpy."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_struct(column.type):
        return np.asarray(column.to_pylist())
    from PIL import Image as PILImage

    mode = "L" if info.num_channels == 1 else "RGB"
    c, h, w = info.shape
    out = np.empty((len(column), h, w) if c == 1 else (len(column), h, w, c), dtype=np.uint8)
    blobs = column.field("bytes").to_pylist()
    paths = column.field("path").to_pylist() if column.type.get_field_index("path") >= 0 else [None] * len(blobs)
    for i, (blob, path) in enumerate(zip(blobs, paths)):
        with PILImage.open(io.BytesIO(blob) if blob is not None else path) as img:
            array = np.asarray(img.convert(mode))
        if array.shape != out.shape[1:]:
            raise ValueError(f"Image {i} of dataset {info.name!r} has shape {array.shape}, expected {out.shape[1:]}")
        out[i] = array
    return out
