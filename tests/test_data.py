"""Data: the real IDX files, every kind of damaged file, the order of sources, the TFDS glue
(mocked, and preparing MNIST for real from the official files, offline), shuffling."""

import gzip
import os
import shutil

import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import data, datasets
from cnn_jax.config import Config
from cnn_jax.data import DataError


def test_real_mnist_from_idx(mnist):
    assert mnist.train_images.shape == (60000, 28, 28, 1) and mnist.test_images.shape == (10000, 28, 28, 1)
    assert mnist.train_images.dtype == np.float32 and mnist.train_labels.dtype == np.int32
    assert mnist.train_images.min() == 0.0 and mnist.train_images.max() == 1.0
    # Mean pixel values published for MNIST (see SOURCE.md): 33.318 train, 33.791 test.
    assert abs(mnist.train_images.mean() * 255 - 33.318) < 0.01
    assert abs(mnist.test_images.mean() * 255 - 33.791) < 0.01
    assert sorted(np.unique(mnist.train_labels)) == list(range(10))
    assert mnist.class_names == tuple("0123456789")


def test_fashion_mnist_from_idx():
    directory = datasets.get("fashion_mnist").system_dirs[0]
    if not os.path.isdir(directory):
        pytest.skip(f"{directory} missing: apt-get install dataset-fashion-mnist")
    ds = data.load_idx_dir(directory, "fashion_mnist")
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.num_classes == 10
    assert ds.class_names[9] == "Ankle boot"
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10


def test_load_applies_subsets(mnist_dir):
    ds = data.load(config_lib.replace(Config(), data_dir=mnist_dir, train_subset=100, test_subset=50))
    assert len(ds.train_labels) == 100 and len(ds.test_images) == 50


def test_raw_idx_files_work_too(tmp_path, mnist_dir):
    for stem in data.IDX_FILES.values():
        with gzip.open(os.path.join(mnist_dir, stem + ".gz")) as f:
            (tmp_path / stem).write_bytes(f.read())
    ds = data.load_idx_dir(str(tmp_path))
    assert len(ds.train_labels) == 60000


@pytest.fixture
def idx_copy(tmp_path, mnist_dir):
    for stem in data.IDX_FILES.values():
        shutil.copy(os.path.join(mnist_dir, stem + ".gz"), tmp_path)
    return tmp_path


def write_gz(path, payload):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def one_line_error(directory, match, name="mnist"):
    with pytest.raises(DataError) as info:
        data.load_idx_dir(str(directory), name)
    message = str(info.value)
    assert "\n" not in message
    assert match in message, message
    return message


def test_missing_file(idx_copy):
    os.remove(idx_copy / "t10k-labels-idx1-ubyte.gz")
    one_line_error(idx_copy, "t10k-labels-idx1-ubyte(.gz): file not found")


def test_missing_directory(tmp_path):
    one_line_error(tmp_path / "nope", "no such directory")


def test_truncated_gzip(idx_copy):
    path = idx_copy / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    msg = one_line_error(idx_copy, "corrupt or truncated gzip")
    assert "train-images-idx3-ubyte.gz" in msg


def test_wrong_magic_number(idx_copy):
    write_gz(idx_copy / "train-labels-idx1-ubyte.gz", b"\x12\x34\x56\x78" + b"\x00" * 100)
    one_line_error(idx_copy, "bad magic number 12345678")


def test_truncated_payload(idx_copy):
    with gzip.open(idx_copy / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    write_gz(idx_copy / "t10k-images-idx3-ubyte.gz", raw[:-784])
    one_line_error(idx_copy, "header says 10000x28x28")


def test_image_and_label_counts_differ(idx_copy):
    labels = np.zeros(9999, np.uint8)
    write_gz(idx_copy / "t10k-labels-idx1-ubyte.gz",
             b"\x00\x00\x08\x01" + (9999).to_bytes(4, "big") + labels.tobytes())
    one_line_error(idx_copy, "test split has 10000 images but 9999 labels")


def test_labels_outside_class_range(idx_copy):
    labels = np.full(10000, 12, np.uint8)
    write_gz(idx_copy / "t10k-labels-idx1-ubyte.gz",
             b"\x00\x00\x08\x01" + (10000).to_bytes(4, "big") + labels.tobytes())
    one_line_error(idx_copy, "labels range 12..12, outside the 10 classes")


def test_tfds_glue_with_mock_data(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_reachable", lambda *a, **k: True)  # the mock stands in for the network
    monkeypatch.setattr(data, "_can_prepare", lambda: True)        # and for preparing
    with tfds.testing.mock_data(num_examples=24):
        ds = data.load_tfds("mnist")
    assert ds.train_images.shape == (24, 28, 28, 1) and ds.train_images.dtype == np.float32
    assert 0.0 <= ds.train_images.min() and ds.train_images.max() <= 1.0
    assert ds.train_labels.dtype == np.int32 and ds.train_labels.max() < 10


def test_tfds_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_reachable", lambda *a, **k: False)
    with pytest.raises(DataError) as info:
        data.load_tfds("mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert message.startswith("TensorFlow Datasets has no copy of 'mnist' and storage.googleapis.com cannot "
                              "be reached (offline?); pass --data_dir with the four IDX files "), message
    assert "$CNN_JAX_MNIST_DIR" in message and "../shared/data/mnist" in message and "\n" not in message


def test_epoch_permutation_is_deterministic_and_changes_per_epoch():
    a, b = data.epoch_permutation(0, 1, 1000), data.epoch_permutation(0, 1, 1000)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, data.epoch_permutation(0, 2, 1000))
    assert not np.array_equal(a, data.epoch_permutation(1, 1, 1000))


def test_unit_float_conversion_is_exactly_divide_by_255():
    every_value = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    converted = data.from_arrays("mnist", every_value, np.zeros(4, np.int64), every_value[:1],
                                 np.zeros(1, np.int64), data.CLASS_NAMES["mnist"]).train_images
    assert converted.dtype == np.float32 and converted.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(converted[..., 0], every_value.astype(np.float32) / 255.0)
