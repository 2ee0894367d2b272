"""Data: the real IDX files, every kind of damaged file, the order of sources, the TFDS glue
(mocked, and preparing MNIST for real from the official files, offline), shuffling."""

import dataclasses
import gzip
import os
import shutil

import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax.data import sources as data
from cnn_jax.data import registry as datasets
from cnn_jax.config import Config
from cnn_jax.data.sources import DataError
from conftest import write_idx_folder


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


def test_hold_out_carves_the_last_training_images(mnist):
    small = dataclasses.replace(mnist, train_images=mnist.train_images[:100], train_labels=mnist.train_labels[:100])
    train_part, images, labels = data.hold_out(small, 30)
    assert len(train_part.train_labels) == 70 and len(labels) == 30
    np.testing.assert_array_equal(train_part.train_images, small.train_images[:70])
    np.testing.assert_array_equal(images, small.train_images[70:])
    np.testing.assert_array_equal(labels, small.train_labels[70:])
    assert train_part.test_images is small.test_images
    for size in (0, 100):
        with pytest.raises(config_lib.ConfigError, match=rf"--validation_size={size} is not allowed: .* give 1..99$"):
            data.hold_out(small, size)


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
    # The TensorFlow-free reading path (TFDS's mock of as_dataset(batch_size=-1) aborts TensorFlow
    # 2.21 with std::length_error; the real as_dataset path is tested on real MNIST below).
    monkeypatch.setattr(data, "_tensorflow_installed", lambda: False)
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


def test_a_download_without_tensorflow_names_the_file_to_install(no_sources, monkeypatch):
    """make train installs no TensorFlow: where the main job must prepare a TFDS download, it says
    in one line what to install."""
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_reachable", lambda *a, **k: True)
    monkeypatch.setattr(data, "_tensorflow_installed", lambda: False)
    with pytest.raises(DataError) as info:
        data.load(Config())
    message = str(info.value)
    assert message.startswith("TensorFlow Datasets needs TensorFlow to prepare 'mnist': "
                              "pip install -r requirements-tfds.txt, or pass --data_dir"), message
    assert "\n" not in message


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


# --- where the data comes from -------------------------------------------------------------------

@pytest.fixture
def no_sources(tmp_path, monkeypatch):
    """No source at all: no CNN_JAX_* variables, an empty TFDS dir, no shared copy, offline."""
    for name in list(os.environ):
        if name.startswith("CNN_JAX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(data, "SHARED_DATA_DIR", str(tmp_path / "shared"))
    monkeypatch.setattr(data, "_reachable", lambda *a, **k: False)
    return tmp_path


def test_sources_in_their_documented_order(no_sources, monkeypatch):
    """Each source is used when those before it are absent, and named."""
    tmp = no_sources
    with pytest.raises(DataError):
        data.find_source("kmnist")
    monkeypatch.setattr(data, "_reachable", lambda *a, **k: True)
    assert data.find_source("mnist") == data.Source("tfds", "", "a TensorFlow Datasets download")
    (tmp / "shared" / "mnist").mkdir(parents=True)
    assert data.find_source("mnist").location == str(tmp / "shared" / "mnist")
    (tmp / "tfds" / "mnist" / "3.0.1").mkdir(parents=True)
    (tmp / "tfds" / "mnist" / "3.0.1" / "dataset_info.json").write_text("{}")
    assert data.find_source("mnist") == data.Source("tfds", str(tmp / "tfds"), "a prepared TensorFlow Datasets copy")
    (tmp / "root" / "mnist").mkdir(parents=True)
    monkeypatch.setenv("CNN_JAX_DATA_DIR", str(tmp / "root"))
    assert data.find_source("mnist") == data.Source("folder", str(tmp / "root" / "mnist"), "$CNN_JAX_DATA_DIR/mnist")
    assert data.find_source("kmnist").kind == "tfds"   # $CNN_JAX_DATA_DIR has no kmnist folder
    monkeypatch.setenv("CNN_JAX_MNIST_DIR", "/somewhere/mnist")
    assert data.find_source("mnist") == data.Source("folder", "/somewhere/mnist", "$CNN_JAX_MNIST_DIR")
    assert data.find_source("mnist", "/given") == data.Source("folder", "/given", "--data_dir")


def test_a_system_folder_comes_after_the_shared_copy(no_sources, monkeypatch):
    monkeypatch.setitem(datasets.REGISTRY, "fashion_mnist", dataclasses.replace(
        datasets.get("fashion_mnist"), system_dirs=(str(no_sources / "system"),)))
    (no_sources / "system").mkdir()
    assert data.find_source("fashion_mnist") == data.Source("folder", str(no_sources / "system"), "a system-wide copy")
    (no_sources / "shared" / "fashion_mnist").mkdir(parents=True)
    assert data.find_source("fashion_mnist").location == str(no_sources / "shared" / "fashion_mnist")


def test_nothing_found_says_what_to_do(no_sources):
    with pytest.raises(DataError) as info:
        data.load(Config())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("no copy of mnist found (looked in $CNN_JAX_MNIST_DIR, $CNN_JAX_DATA_DIR/mnist, "
                              f"{no_sources / 'tfds' / 'mnist'}, {no_sources / 'shared' / 'mnist'})")
    assert "pass --data_dir=FOLDER holding the four IDX files" in message
    assert message.endswith("or set $CNN_JAX_MNIST_DIR=FOLDER")


def test_the_source_is_named_and_the_shared_copy_is_found_from_the_package(no_sources, mnist_dir):
    shared = no_sources / "shared" / "mnist"   # the shared data folder of `no_sources`, holding the tests' MNIST
    shared.parent.mkdir()
    shared.symlink_to(os.path.abspath(mnist_dir), target_is_directory=True)
    ds = data.load(config_lib.replace(Config(), train_subset=10, test_subset=10))
    assert ds.source == f"mnist from {shared} (the project machines' shared copy beside the repository)"


def test_shared_data_dir_is_relative_to_the_repository_not_the_cwd():
    assert data.SHARED_DATA_DIR == os.path.normpath(
        os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(data.__file__)))), "..",
                     "shared", "data"))   # the repository: three levels above cnn_jax/data/sources.py


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    write_gz(path, header + array.astype(np.uint8).tobytes())


def test_kmnist_from_idx_files_written_here(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (12, 28, 28)), "train_labels": np.arange(12) % 10,
              "test_images": rng.integers(0, 256, (5, 28, 28)), "test_labels": np.arange(5)}
    for key, stem in data.IDX_FILES.items():
        write_idx(tmp_path / (stem + ".gz"), arrays[key])
    ds = data.load(config_lib.replace(Config(), dataset="kmnist", data_dir=str(tmp_path)))
    assert ds.class_names[0] == "o" and ds.train_images.shape == (12, 28, 28, 1)
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays["train_images"].astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])


def test_a_flag_that_contradicts_the_data_is_one_line(mnist_dir):
    for overrides, fragment in (({"num_classes": 5}, "mnist has 10 classes but --num_classes is 5; drop "
                                                     "--num_classes (it follows --dataset) or set --num_classes=10"),
                                ({"input_shape": (32, 32, 3)}, "set --input_shape=28,28,1")):
        with pytest.raises(DataError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            data.load(config_lib.replace(Config(), data_dir=mnist_dir, test_subset=1, **overrides))


def test_a_tfds_source_reaches_the_file_tests_as_the_same_idx_files(tmp_path, mnist):
    """Where the tests' MNIST is a TFDS copy, conftest writes it out as IDX files for --data_dir:
    they read back as exactly the arrays written."""
    small = dataclasses.replace(mnist, train_images=mnist.train_images[:300], train_labels=mnist.train_labels[:300],
                                test_images=mnist.test_images[:100], test_labels=mnist.test_labels[:100])
    again = data.load_folder(write_idx_folder(str(tmp_path / "mnist"), small))
    for key in data.IDX_FILES:
        np.testing.assert_array_equal(getattr(again, key), getattr(small, key))
    assert sorted(os.listdir(tmp_path / "mnist")) == sorted(stem + ".gz" for stem in data.IDX_FILES.values())


@pytest.mark.slow
def test_tfds_prepares_mnist_offline_from_the_official_files(tmp_path, monkeypatch, mnist_source, mnist_dir,
                                                              mnist):
    """TFDS prepares MNIST from the official files handed over as a manual download (no network),
    into a temporary TFDS data dir; the arrays are the IDX reader's, exactly. TFDS shuffles the
    examples when it prepares, so the (image, label) pairs are compared in a canonical order."""
    # Where the tests' MNIST is a TFDS copy, conftest's IDX files are written from it: not the official bytes.
    if mnist_source.kind == "tfds":
        pytest.skip(f"needs the official IDX files, and the tests' MNIST is {mnist_source.describe('mnist')}; "
                    "set CNN_JAX_MNIST_DIR=FOLDER holding them")
    pytest.importorskip("tensorflow", reason="preparing needs TensorFlow: pip install -r requirements-tfds.txt")
    monkeypatch.setattr(data, "_reachable", lambda *a, **k: False)   # offline, for certain
    tfds_dir = tmp_path / "tfds"
    prepared = data.load_tfds("mnist", data_dir=str(tfds_dir), manual_dir=mnist_dir)

    def canonical(images, labels):
        pixels = np.rint(images.reshape(len(images), -1) * 255).astype(np.uint8)
        rows = np.concatenate([pixels, labels[:, None].astype(np.uint8)], axis=1)
        return rows[np.lexsort(rows.T[::-1])]

    for split in ("train", "test"):
        images, labels = getattr(prepared, f"{split}_images"), getattr(prepared, f"{split}_labels")
        assert images.dtype == np.float32 and labels.dtype == np.int32
        assert images.shape == getattr(mnist, f"{split}_images").shape
        np.testing.assert_array_equal(canonical(images, labels),
                                      canonical(getattr(mnist, f"{split}_images"), getattr(mnist, f"{split}_labels")))
    # Once prepared, the copy is the default source before the shared folder, and reads back the same.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    for name in list(os.environ):
        if name.startswith("CNN_JAX_"):
            monkeypatch.delenv(name)
    again = data.load(Config())
    assert again.source == f"mnist from {tfds_dir} (a prepared TensorFlow Datasets copy)"
    np.testing.assert_array_equal(again.train_images, prepared.train_images)
    np.testing.assert_array_equal(again.test_labels, prepared.test_labels)
