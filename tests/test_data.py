"""Tests of hf_camhd.data: sources (sklearn, save_to_disk, parquet, IDX, Debian package), errors, tensors, augmentation."""

from __future__ import annotations

import dataclasses
import gzip
import math
import struct
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hf_camhd.data import (
    DATASETS,
    DatasetUnavailableError,
    RandomCropFlip,
    TensorImageDataset,
    as_dataloader,
    as_tensors,
    build_image_dataset,
    dataset_info,
    find_idx_files,
    image_features,
    list_datasets,
    load_image_dataset,
    read_idx,
    train_transform,
)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No test may reach the Hub: offline env vars AND the already-imported module constants."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path / "hf_cache"


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


def _tensors(split):
    x, y = as_tensors(split)
    return x.clone(), y.clone()


def _assert_same_split(a, b):
    xa, ya = as_tensors(a)
    xb, yb = as_tensors(b)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.features == b.features


# ----------------------------------------------------------------------------------------------- info


def test_dataset_info_is_consistent_for_every_name():
    assert list_datasets() == ["digits", "mnist", "fashion_mnist", "cifar10", "svhn"]
    for name in list_datasets():
        info = dataset_info(name)
        assert info.name == name and info.num_classes == 10
        assert len(info.mean) == len(info.std) == info.num_channels
        assert info.shape == (info.num_channels, info.image_size, info.image_size)
        assert all(0 < m < 1 and 0 < s < 1 for m, s in zip(info.mean, info.std))
    assert dataset_info("Fashion-MNIST") is dataset_info("fashion_mnist")
    assert (dataset_info("cifar10").shape, dataset_info("svhn").hub_config) == ((3, 32, 32), "cropped_digits")
    assert dataset_info("fashion_mnist").class_names[0] == "T-shirt/top"


def test_unknown_dataset_and_split_raise_value_error():
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet'; expected one of digits, mnist"):
        dataset_info("imagenet")
    with pytest.raises(ValueError, match="Invalid split: 'validation'"):
        load_image_dataset("digits", split="validation")
    with pytest.raises(ValueError, match="Invalid max_samples"):
        load_image_dataset("digits", max_samples=0)


# ----------------------------------------------------------------------------------------------- digits


def test_digits_loads_offline_with_expected_shapes_and_classes(digits):
    info = dataset_info("digits")
    assert isinstance(digits, datasets.DatasetDict) and set(digits) == {"train", "test"}
    assert (digits["train"].num_rows, digits["test"].num_rows) == (info.train_size, info.test_size) == (1438, 359)
    for split in digits.values():
        assert split.features == image_features((1, 8, 8), info.class_names)
        assert split.format["type"] == "torch"
        batch = split[:4]
        assert batch["pixel_values"].shape == (4, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
        assert batch["labels"].dtype == torch.int64
    x, y = as_tensors(digits["train"])
    assert set(y.tolist()) == set(range(10))
    # standardised with the train statistics
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2


def test_digits_split_is_deterministic_disjoint_and_complete(digits):
    from sklearn.datasets import load_digits

    again = load_image_dataset("digits", normalize=False)
    raw = load_digits()
    pool = {tuple(img.ravel() / 16.0): int(t) for img, t in zip(raw.images, raw.target)}
    seen = []
    for name in ("train", "test"):
        x, y = as_tensors(again[name])
        rows = [tuple(v) for v in x.double().reshape(len(x), -1).numpy()]
        assert all(pool[r] == t for r, t in zip(rows, y.tolist()))  # each image kept its label
        seen += rows
    assert len(seen) == 1797
    # the same seed gives the same split; another seed gives another one
    _assert_same_split(load_image_dataset("digits")["test"], digits["test"])
    assert not torch.equal(as_tensors(load_image_dataset("digits", seed=1)["test"])[1], as_tensors(digits["test"])[1])


def test_digits_normalisation_constants_are_the_train_statistics():
    x, _ = as_tensors(load_image_dataset("digits", normalize=False)["train"])
    info = dataset_info("digits")
    assert x.min() >= 0 and x.max() <= 1
    assert x.double().mean().item() == pytest.approx(info.mean[0], abs=1e-4)
    assert x.double().std(unbiased=False).item() == pytest.approx(info.std[0], abs=1e-4)


def test_split_and_max_samples(digits):
    test = load_image_dataset("digits", split="test", max_samples=7)
    assert isinstance(test, datasets.Dataset) and test.num_rows == 7
    assert torch.equal(as_tensors(test)[0], as_tensors(digits["test"])[0][:7])


def test_build_image_dataset_matches_from_dict():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((70, 3, 5, 4)).astype(np.float32)
    y = rng.integers(0, 3, 70)
    names = ["a", "b", "c"]
    fast = build_image_dataset(x, y, names)
    slow = datasets.Dataset.from_dict(
        {"pixel_values": x, "labels": y}, features=image_features((3, 5, 4), names)
    ).with_format("torch")
    assert fast.features == slow.features
    _assert_same_split(fast, slow)
    assert torch.equal(fast[3:9]["pixel_values"], torch.from_numpy(x[3:9]))
    with pytest.raises(ValueError, match="labels must lie in"):
        build_image_dataset(x, y + 3, names)


# ----------------------------------------------------------------------------------------------- local folders


def test_save_to_disk_folder_round_trips(tmp_path, digits):
    digits.save_to_disk(tmp_path / "dict")
    loaded = load_image_dataset("digits", data_dir=tmp_path / "dict")
    for split in ("train", "test"):
        _assert_same_split(loaded[split], digits[split])
        assert loaded[split].format["type"] == "torch"
    # one saved Dataset per split folder works too
    for split in ("train", "test"):
        digits[split].save_to_disk(tmp_path / "per_split" / split)
    _assert_same_split(load_image_dataset("digits", data_dir=tmp_path / "per_split", split="test"), digits["test"])


def test_parquet_folder_round_trips(tmp_path, digits):
    # the Hub's parquet layout: <config>/<split>-00000-of-0000N.parquet, several shards
    folder = tmp_path / "pq" / "default"
    folder.mkdir(parents=True)
    digits["train"].select(range(0, 700)).to_parquet(folder / "train-00000-of-00002.parquet")
    digits["train"].select(range(700, 1438)).to_parquet(folder / "train-00001-of-00002.parquet")
    digits["test"].to_parquet(folder / "test-00000-of-00001.parquet")
    loaded = load_image_dataset("digits", data_dir=tmp_path / "pq")
    for split in ("train", "test"):
        _assert_same_split(loaded[split], digits[split])


def test_parquet_without_hf_metadata_is_rebuilt(tmp_path, digits):
    x, y = _tensors(digits["test"])
    table = pa.table({"pixel_values": pa.array(x.numpy().tolist()), "labels": pa.array(y.numpy())})
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        pq.write_table(table, tmp_path / split / "data.parquet")  # split given by the folder name
    loaded = load_image_dataset("digits", data_dir=tmp_path, split="train")
    _assert_same_split(loaded, digits["test"])


def test_raw_image_parquet_is_decoded_and_normalised(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(12) % 10
    raw = datasets.Dataset.from_dict(
        {"img": [Image.fromarray(a) for a in images], "label": labels},
        features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}),
    )
    (tmp_path / "plain_text").mkdir()
    raw.to_parquet(tmp_path / "plain_text" / "train-00000-of-00001.parquet")
    raw.select(range(4)).to_parquet(tmp_path / "plain_text" / "test-00000-of-00001.parquet")

    loaded = load_image_dataset("cifar10", data_dir=tmp_path)
    info = dataset_info("cifar10")
    x, y = as_tensors(loaded["train"])
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, torch.from_numpy(labels))
    assert loaded["test"].num_rows == 4
    assert loaded["train"].features["labels"].names == list(info.class_names)


def test_data_dir_with_wrong_image_shape_is_a_value_error(tmp_path, digits):
    digits.save_to_disk(tmp_path)
    with pytest.raises(ValueError, match=r"expected \(1, 28, 28\)"):
        load_image_dataset("mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- IDX


def _idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + big_endian.tobytes()


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize(
    "dtype, code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D), (np.float64, 0x0E)]
)
def test_read_idx_reads_what_was_written(tmp_path, compressed, dtype, code):
    rng = np.random.default_rng(code)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    payload = _idx_bytes(array, code)
    path = tmp_path / ("a-idx3-ubyte" + (".gz" if compressed else ""))
    path.write_bytes(gzip.compress(payload) if compressed else payload)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_detects_gzip_by_content_and_rejects_bad_files(tmp_path):
    labels = np.arange(7, dtype=np.uint8)
    (tmp_path / "labels-no-suffix").write_bytes(gzip.compress(_idx_bytes(labels, 0x08)))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels-no-suffix"), labels)
    (tmp_path / "truncated").write_bytes(_idx_bytes(labels, 0x08)[:-1])
    with pytest.raises(ValueError, match="but 6 bytes follow"):
        read_idx(tmp_path / "truncated")
    (tmp_path / "not-idx").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="bad magic number"):
        read_idx(tmp_path / "not-idx")


def _write_mnist_style_folder(folder: Path, n_train=30, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, array, ndim in (("images", images, 3), ("labels", labels, 1)):
            payload = _idx_bytes(array, 0x08)
            name = f"{prefix}-{kind}-idx{ndim}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
        arrays["train" if prefix == "train" else "test"] = (images, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_idx_folder_loads_as_fashion_mnist(tmp_path, gz):
    arrays = _write_mnist_style_folder(tmp_path / "fm", gz=gz)
    assert set(find_idx_files(tmp_path / "fm")) == {"train", "test"}
    loaded = load_image_dataset("fashion_mnist", data_dir=tmp_path / "fm")
    info = dataset_info("fashion_mnist")
    for split, (images, labels) in arrays.items():
        x, y = as_tensors(loaded[split])
        expected = (torch.from_numpy(images).float().unsqueeze(1) / 255 - info.mean[0]) / info.std[0]
        torch.testing.assert_close(x, expected)
        assert torch.equal(y, torch.from_numpy(labels).long())
    assert loaded["train"].features["labels"].names[-1] == "Ankle boot"


# ----------------------------------------------------------------------------------------------- missing data


def test_missing_data_dir_raises_one_clear_error(tmp_path, offline):
    with pytest.raises(DatasetUnavailableError) as caught:
        load_image_dataset("fashion_mnist", data_dir=tmp_path / "nowhere", cache_dir=offline)
    message = str(caught.value)
    assert "does not exist" in message and str(tmp_path / "nowhere") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data_dir=" in message and "save_to_disk" in message and "parquet" in message and "IDX" in message
    assert isinstance(caught.value, RuntimeError)


def test_data_dir_without_data_raises_one_clear_error(tmp_path, offline):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetUnavailableError, match="holds none of a save_to_disk folder"):
        load_image_dataset("mnist", data_dir=tmp_path / "empty", cache_dir=offline)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "svhn"])
def test_unavailable_everywhere_names_the_hub_dataset_and_the_fixes(monkeypatch, tmp_path, offline, name):
    info = dataset_info(name)
    if info.system_dir is not None:  # pretend the Debian package is not installed
        monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, system_dir=tmp_path / "not-installed"))
    with pytest.raises(DatasetUnavailableError) as caught:
        load_image_dataset(name, cache_dir=offline)
    message = str(caught.value)
    assert f"the Hub dataset {info.hub_id!r} (needs network" in message
    assert "pass data_dir= pointing to a save_to_disk folder, train/test parquet files, or MNIST-style IDX files" in message
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in message and "not-installed (not found)" in message
    # one exception, not a chained traceback from inside datasets
    assert caught.value.__cause__ is None and caught.value.__context__ is None

    with pytest.raises(DatasetUnavailableError, match=r"skipped: use_hub=False"):
        load_image_dataset(name, use_hub=False)


# ----------------------------------------------------------------------------------------------- Debian package


def test_system_folder_idx_files_load_without_data_dir(monkeypatch, tmp_path, offline):
    """The path the Debian package takes (IDX files in the dataset's system folder, found with no data_dir), on
    files written here: it runs on every machine, whatever is installed."""
    arrays = _write_mnist_style_folder(tmp_path / "system", n_train=12, n_test=4)
    info = dataset_info("fashion_mnist")
    monkeypatch.setitem(DATASETS, "fashion_mnist", dataclasses.replace(info, system_dir=tmp_path / "system"))
    loaded = load_image_dataset("fashion_mnist", use_hub=False, cache_dir=offline)
    for split, (images, labels) in arrays.items():
        x, y = as_tensors(loaded[split])
        torch.testing.assert_close(x, (torch.from_numpy(images).float().unsqueeze(1) / 255 - info.mean[0]) / info.std[0])
        assert torch.equal(y, torch.from_numpy(labels).long())


def test_debian_fashion_mnist_loads_full_splits():
    # the real data: README command 2 installs the Debian package (.ci/run runs that command); without it this is
    # a setup error with the exact fix, not a skip
    assert (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(), (
        f"Fashion-MNIST is not in {DEBIAN_FASHION_MNIST}. On Debian / Ubuntu (as root): apt-get update && apt-get "
        "install -y dataset-fashion-mnist (README command 2 runs this). Elsewhere: put the four files "
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz "
        f"of https://github.com/zalandoresearch/fashion-mnist in {DEBIAN_FASHION_MNIST}")
    assert sorted(p.name for p in DEBIAN_FASHION_MNIST.iterdir() if "idx" in p.name) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    ds = load_image_dataset("fashion_mnist", use_hub=False)
    assert (ds["train"].num_rows, ds["test"].num_rows) == (60000, 10000)
    x, y = as_tensors(ds["train"])
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))  # Fashion-MNIST is balanced
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3  # the documented mean/std
    assert torch.equal(torch.bincount(as_tensors(ds["test"])[1]), torch.full((10,), 1000))


# ----------------------------------------------------------------------------------------------- augmentation


def _crop_flip_reference(image, oy, ox, flip, size, padding, fill=0.0):
    padded = torch.nn.functional.pad(image, (padding,) * 4, value=fill)
    out = padded[:, oy : oy + size, ox : ox + size]
    return out.flip(-1) if flip else out


def test_random_crop_flip_matches_a_per_image_reference():
    images = torch.randn(16, 3, 32, 32)
    augment = RandomCropFlip(32, padding=4, generator=torch.Generator().manual_seed(3))
    out = augment(images)
    # replay the draws: offsets y, offsets x, then flips, from the same seed
    g = torch.Generator().manual_seed(3)
    oy, ox = torch.randint(0, 9, (16,), generator=g), torch.randint(0, 9, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    assert 0 < flip.sum() < 16 and len(set(oy.tolist())) > 1
    for i in range(16):
        ref = _crop_flip_reference(images[i], int(oy[i]), int(ox[i]), bool(flip[i]), 32, 4)
        assert torch.equal(out[i], ref)


def test_random_crop_flip_edge_cases():
    images = torch.randn(4, 1, 8, 8)
    assert torch.equal(RandomCropFlip(8, padding=0, flip_prob=0.0)(images), images)
    assert torch.equal(RandomCropFlip(8, padding=0, flip_prob=1.0)(images), images.flip(-1))
    single = RandomCropFlip(8, padding=2, generator=torch.Generator().manual_seed(0))(images[0])
    assert single.shape == (1, 8, 8)
    fill = torch.tensor([-5.0])
    padded = RandomCropFlip(8, padding=8, flip_prob=0.0, fill=fill, generator=torch.Generator().manual_seed(1))
    assert (padded(torch.zeros(64, 1, 8, 8)) == -5.0).any()
    seeded = [RandomCropFlip(8, 2, generator=torch.Generator().manual_seed(7))(images) for _ in range(2)]
    assert torch.equal(*seeded)
    with pytest.raises(ValueError, match="Invalid padding"):
        RandomCropFlip(8, padding=-1)


def test_train_transform_only_for_cifar10():
    augment = train_transform("cifar10", generator=torch.Generator().manual_seed(0))
    assert isinstance(augment, RandomCropFlip) and (augment.size, augment.padding, augment.flip_prob) == (32, 4, 0.5)
    assert all(train_transform(name) is None for name in ("digits", "mnist", "fashion_mnist", "svhn"))


# ----------------------------------------------------------------------------------------------- tensors / loaders


def test_as_tensors_and_seeded_dataloader(digits):
    x, y = as_tensors(digits["train"])
    assert x.shape == (1438, 1, 8, 8) and y.shape == (1438,)

    def epoch(seed):
        return [b for b in as_dataloader(digits["train"], 100, shuffle=True, seed=seed)]

    first, second = epoch(0), epoch(0)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, second))
    assert not torch.equal(first[0]["labels"], epoch(1)[0]["labels"])
    assert [len(b["labels"]) for b in first] == [100] * 14 + [38]
    # every example exactly once per epoch
    got = torch.cat([b["pixel_values"] for b in first]).reshape(1438, -1)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, x.reshape(1438, -1).tolist()))
    ordered = next(iter(as_dataloader(digits["test"], 10)))
    assert torch.equal(ordered["pixel_values"], as_tensors(digits["test"])[0][:10])


def test_dataloader_applies_the_batch_transform():
    x = torch.randn(20, 3, 32, 32)
    data = TensorImageDataset(x, torch.arange(20) % 10)
    batch = next(iter(as_dataloader(data, 20, transform=lambda b: b * 0 + 1)))
    assert torch.equal(batch["pixel_values"], torch.ones(20, 3, 32, 32))
    assert torch.equal(next(iter(as_dataloader(data, 20)))["pixel_values"], x)  # the original is untouched
    with pytest.raises(ValueError, match="disagree"):
        TensorImageDataset(x, torch.arange(3))


def test_trainer_trains_on_an_augmented_tensor_dataset(tmp_path, digits):
    from transformers import Trainer, TrainingArguments

    from hf_camhd.models import LeNet5

    torch.manual_seed(0)
    model = LeNet5(in_channels=1, image_size=8)
    augment = RandomCropFlip(8, padding=1, generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=32, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TensorImageDataset.from_split(digits["train"], transform=augment),
        eval_dataset=digits["test"],
    )
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert math.isfinite(trainer.evaluate()["eval_loss"])
