"""Readers for the official on-disk dataset formats: IDX (MNIST family) and CIFAR batches.

Each reader turns files into uint8 images (N, H, W, C) and integer labels, checking every
header, size and count on the way. Whatever the bytes (empty, truncated, not gzip, garbage
inside a valid gzip, a pickle of the wrong shape), a failure is a `DataError` with a
one-line message naming the file and the fix; no other exception leaves this module.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import zlib
from typing import Any

import numpy as np


class DataError(RuntimeError):
    """The data could not be loaded; the message is one line meant for the user."""


Arrays = dict[str, np.ndarray]   # train_images, train_labels, test_images, test_labels

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _gunzip(path: str, raw: bytes) -> bytes:
    """`raw` decompressed when it starts with the gzip magic, else as it is."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip ({e}); download the file again") from None


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
    """One IDX file of unsigned bytes (gzip-compressed or raw) as a uint8 array, header checked.

    `ndim`, when given, is the number of dimensions the file must have (3 for images, 1 for labels)."""
    raw = _gunzip(path, _read_bytes(path))
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number "
                        f"{raw[:4].hex() or 'empty'}); point --data_dir at the original IDX files")
    dims = raw[3]
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path}: IDX header is truncated; download the file again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    if ndim is not None and dims != ndim:
        raise DataError(f"{path}: has {dims} dimensions {'x'.join(map(str, shape)) or '()'} where "
                        f"{ndim} were expected ({'N x H x W images' if ndim == 3 else 'N labels'}); "
                        "the file is not the one its name says")
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise DataError(f"{path}: holds {len(raw) - header} data bytes but its header says "
                        f"{'x'.join(map(str, shape))} = {expected}; the file is truncated or damaged, "
                        "download it again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find_idx(folder: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    raise DataError(f"{os.path.join(folder, stem)}(.gz): file not found; --data_dir must hold the four "
                    f"IDX files {', '.join(IDX_FILES.values())} (.gz or raw)")


def read_idx_folder(folder: str) -> Arrays:
    """The four IDX files of an MNIST-family dataset: images (N, H, W, 1), labels (N,)."""
    arrays = {}
    for key, stem in IDX_FILES.items():
        array = read_idx(_find_idx(folder, stem), ndim=3 if key.endswith("images") else 1)
        arrays[key] = array[..., None] if key.endswith("images") else array
    return arrays


# --- CIFAR ----------------------------------------------------------------------------------

CIFAR_SIDE, CIFAR_CHANNELS = 32, 3
CIFAR_PIXELS = CIFAR_SIDE * CIFAR_SIDE * CIFAR_CHANNELS   # 3072 bytes: R plane, G plane, B plane


def _planes_to_nhwc(pixels: np.ndarray) -> np.ndarray:
    """(N, 3072) rows of channel planes -> (N, 32, 32, 3) uint8."""
    return pixels.reshape(-1, CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays only: a CIFAR batch needs no more, and a
    pickle from elsewhere must not run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}   # how Python 3's protocol 2 writes bytes

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_pickle(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch (a pickled dict with `data` (N, 3072) and `label_key`):
    images (N, 32, 32, 3) uint8 and labels (N,) int64."""
    raw = _read_bytes(path)
    fix = "download and extract the python version of the dataset again"
    try:
        batch = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - pickle raises a dozen types on undecodable bytes
        raise DataError(f"{path}: not a CIFAR python batch ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:100]}); {fix}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path}: not a CIFAR python batch (holds a {type(batch).__name__}, not a dict); {fix}")
    entries = {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in batch.items()}
    missing = [key for key in ("data", label_key) if key not in entries]
    if missing:
        raise DataError(f"{path}: CIFAR batch has no {' or '.join(repr(k) for k in missing)} entry; {fix}")
    data, labels = entries["data"], entries[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != CIFAR_PIXELS:
        described = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is a {described}, not N x {CIFAR_PIXELS} uint8; {fix}")
    try:
        labels = np.asarray(labels)
        ok = labels.ndim == 1 and (labels.size == 0 or np.issubdtype(labels.dtype, np.integer))
    except Exception:  # noqa: BLE001 - ragged or odd objects
        ok = False
    if not ok:
        raise DataError(f"{path}: {label_key!r} is not a list of integer labels; {fix}")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} {label_key!r}; {fix}")
    return _planes_to_nhwc(data), labels.astype(np.int64)


def read_cifar_binary(path: str, label_bytes: int, label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR binary batch: records of `label_bytes` label bytes then 3072 pixel bytes;
    the label is byte `label_index` of each record (CIFAR-100: 0 coarse, 1 fine)."""
    raw = _read_bytes(path)
    record = label_bytes + CIFAR_PIXELS
    if len(raw) == 0 or len(raw) % record:
        raise DataError(f"{path}: {len(raw)} bytes is not a whole number of {record}-byte records "
                        f"({label_bytes} label byte{'s' if label_bytes > 1 else ''} + {CIFAR_PIXELS} "
                        "pixels); the file is truncated or of another dataset, download it again")
    records = np.frombuffer(raw, np.uint8).reshape(-1, record)
    return _planes_to_nhwc(records[:, label_bytes:]), records[:, label_index].astype(np.int64)


# Each CIFAR format: the extracted folder's name, its train and test batch files, the reader.
CIFAR_FORMATS = {
    "cifar10": (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
         lambda path: read_cifar_pickle(path, "labels")),
        ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"],
         lambda path: read_cifar_binary(path, 1, 0)),
    ),
    "cifar100": (
        ("cifar-100-python", ["train"], ["test"], lambda path: read_cifar_pickle(path, "fine_labels")),
        ("cifar-100-binary", ["train.bin"], ["test.bin"], lambda path: read_cifar_binary(path, 2, 1)),
    ),
}


def read_cifar_folder(folder: str, name: str) -> Arrays:
    """CIFAR-10 or CIFAR-100 (`name`) from its extracted folder, python or binary batches, or
    from the folder above it."""
    formats = CIFAR_FORMATS[name]
    for subfolder, train_files, test_files, reader in formats:
        for candidate in (folder, os.path.join(folder, subfolder)):
            if not os.path.exists(os.path.join(candidate, train_files[0])):
                continue
            arrays = {}
            for split, files in (("train", train_files), ("test", test_files)):
                parts = []
                for file in files:
                    path = os.path.join(candidate, file)
                    if not os.path.exists(path):
                        raise DataError(f"{path}: file not found; {candidate} must hold "
                                        f"{', '.join(train_files + test_files)}: extract the dataset again")
                    parts.append(reader(path))
                arrays[f"{split}_images"] = np.concatenate([images for images, _ in parts])
                arrays[f"{split}_labels"] = np.concatenate([labels for _, labels in parts])
            return arrays
    expected = " or ".join(f"{sub}/ ({', '.join(train + test)})" for sub, train, test, _ in formats)
    raise DataError(f"{folder}: holds no {name} batches; --data_dir must be the extracted {expected} "
                    "or the folder above it")
