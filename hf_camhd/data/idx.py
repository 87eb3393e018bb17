"""Read IDX files (the MNIST / Fashion-MNIST format), plain or gzipped, into numpy arrays."""

from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "find_idx_files"]

# IDX type codes (third magic byte) -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file into an array of its declared shape and type (native byte order).

    The format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions ``d``, ``d`` big-endian uint32 sizes, then the
    data, big-endian, C order. A gzipped file (detected from its first two bytes, whatever its name)
    is decompressed first.

    Raises:
        ValueError: the file is not IDX, is truncated (a gzip stream cut short, or fewer bytes than its
            header declares) or its size disagrees with its header; the message names the file.

    Example:
        >>> from hf_camhd.data import read_idx
        >>> images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")  # doctest: +SKIP
        >>> images.shape, images.dtype  # doctest: +SKIP
        ((10000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == _GZIP_MAGIC else open
    again = "download the file again (or delete it)"
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"Invalid IDX file {str(path)!r}: its gzip stream is truncated or corrupted "
                         f"({type(err).__name__}: {err}); {again}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"Invalid IDX file {str(path)!r}: bad magic number {data[:4].hex() or '(empty)'} (an IDX "
                         "file starts with two zero bytes, a type code and the number of dimensions); it is not an "
                         "MNIST-style IDX file: replace it with one (or delete it)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"Invalid IDX file {str(path)!r}: unknown type code 0x{type_code:02x} (expected one of "
                         f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}); {again}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise ValueError(f"Invalid IDX file {str(path)!r}: truncated header ({ndim} dimensions declared); {again}")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header_end != expected:
        raise ValueError(
            f"Invalid IDX file {str(path)!r}: header declares shape {shape} ({expected} bytes of {dtype.name}) "
            f"but {len(data) - header_end} bytes follow (truncated or damaged); {again}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_end).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


# train-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte, train-images.idx3-ubyte, test-images-idx3-ubyte, ...
_IDX_NAME = re.compile(r"^(?P<split>train|t10k|test)-(?P<kind>images|labels)[.-]idx(?P<ndim>\d)-ubyte(\.gz)?$")


def find_idx_files(folder: str | os.PathLike) -> dict[str, dict[str, Path]]:
    """Find MNIST-style IDX files in ``folder`` (not recursive).

    Returns ``{"train": {"images": path, "labels": path}, "test": {...}}`` with only the splits for
    which both files exist. ``t10k-*`` and ``test-*`` both name the test split; an uncompressed file
    wins over a ``.gz`` one with the same stem.
    """
    folder = Path(folder)
    found: dict[str, dict[str, Path]] = {}
    if not folder.is_dir():
        return {}
    for path in sorted(folder.iterdir(), key=lambda p: (p.name.endswith(".gz"), p.name)):
        match = _IDX_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        split = "train" if match["split"] == "train" else "test"
        found.setdefault(split, {}).setdefault(match["kind"], path)
    return {split: files for split, files in found.items() if set(files) == {"images", "labels"}}
