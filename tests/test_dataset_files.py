"""The file readers: CIFAR python and binary batches written here in the exact official formats,
every kind of damaged file, and random bytes (hypothesis) fed to each reader."""

import gzip
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn_jax.data import files as dataset_files
from cnn_jax.data.files import DataError

CIFAR10_PY = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
CIFAR10_BIN = [name + ".bin" for name in CIFAR10_PY]


def cifar_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def planes(images):
    """NHWC -> the official rows: 1024 red bytes, 1024 green, 1024 blue (each row-major)."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_pickle_batch(path, images, labels, label_key="labels", coarse_labels=None):
    """A batch as CIFAR's python version pickled it (Python 2: bytes keys, protocol 2)."""
    batch = {b"batch_label": b"batch", label_key.encode(): list(map(int, labels)), b"data": planes(images),
             b"filenames": [b"x.png"] * len(images)}
    if coarse_labels is not None:   # CIFAR-100 keeps both
        batch[b"coarse_labels"] = list(map(int, coarse_labels))
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_binary_batch(path, images, labels_columns):
    """Records of label byte(s) then 3072 pixel bytes, as in cifar-10-batches-bin / cifar-100-binary."""
    labels = np.stack(labels_columns, axis=1).astype(np.uint8)
    path.write_bytes(np.concatenate([labels, planes(images)], axis=1).tobytes())


def write_cifar10(folder, fmt, sizes=(3, 2, 1, 4, 2, 5)):
    """A CIFAR-10 folder with batches of the given sizes; returns the expected arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {"train_images": [], "train_labels": [], "test_images": [], "test_labels": []}
    for i, (name, n) in enumerate(zip(CIFAR10_PY, sizes)):
        images, labels = cifar_images(n, i), np.arange(n) % 10
        if fmt == "py":
            write_pickle_batch(folder / name, images, labels)
        else:
            write_binary_batch(folder / (name + ".bin"), images, [labels])
        split = "test" if name == "test_batch" else "train"
        expected[f"{split}_images"].append(images)
        expected[f"{split}_labels"].append(labels)
    return {k: np.concatenate(v) for k, v in expected.items()}


def assert_arrays_equal(actual, expected):
    assert sorted(actual) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
    assert actual["train_images"].dtype == np.uint8 and actual["train_images"].shape[1:] == (32, 32, 3)


@pytest.mark.parametrize("fmt,subfolder", [("py", "cifar-10-batches-py"), ("bin", "cifar-10-batches-bin")])
def test_cifar10_from_the_extracted_folder_or_its_parent(tmp_path, fmt, subfolder):
    expected = write_cifar10(tmp_path / subfolder, fmt)
    assert_arrays_equal(dataset_files.read_cifar_folder(str(tmp_path / subfolder), "cifar10"), expected)
    assert_arrays_equal(dataset_files.read_cifar_folder(str(tmp_path), "cifar10"), expected)


def test_cifar_pixel_order_is_channel_planes():
    """Byte 0 is the red of pixel (0, 0), byte 1 the red of (0, 1), byte 1024 the green of (0, 0)."""
    row = np.zeros((1, 3072), np.uint8)
    row[0, 0], row[0, 1], row[0, 1024], row[0, 2048 + 32] = 10, 11, 20, 30
    image = dataset_files._planes_to_nhwc(row)[0]
    assert image[0, 0].tolist() == [10, 20, 0] and image[0, 1, 0] == 11 and image[1, 0, 2] == 30


def test_cifar100_fine_labels_python_and_binary(tmp_path):
    images_train, images_test = cifar_images(4, 0), cifar_images(3, 1)
    fine_train, coarse_train = np.array([99, 0, 57, 3]), np.array([19, 4, 7, 2])
    fine_test, coarse_test = np.array([1, 2, 98]), np.array([0, 1, 18])
    py = tmp_path / "py" / "cifar-100-python"
    py.mkdir(parents=True)
    write_pickle_batch(py / "train", images_train, fine_train, "fine_labels", coarse_labels=coarse_train)
    write_pickle_batch(py / "test", images_test, fine_test, "fine_labels", coarse_labels=coarse_test)
    binary = tmp_path / "bin" / "cifar-100-binary"
    binary.mkdir(parents=True)
    write_binary_batch(binary / "train.bin", images_train, [coarse_train, fine_train])   # coarse first
    write_binary_batch(binary / "test.bin", images_test, [coarse_test, fine_test])
    expected = {"train_images": images_train, "train_labels": fine_train,
                "test_images": images_test, "test_labels": fine_test}
    for folder in (py, py.parent, binary, binary.parent):
        assert_arrays_equal(dataset_files.read_cifar_folder(str(folder), "cifar100"), expected)


def one_line(fn, *args, match):
    with pytest.raises(DataError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


def test_missing_cifar_batch(tmp_path):
    write_cifar10(tmp_path, "py")
    os.remove(tmp_path / "data_batch_3")
    one_line(dataset_files.read_cifar_folder, str(tmp_path), "cifar10",
             match="data_batch_3: file not found")


def test_folder_without_cifar_batches(tmp_path):
    msg = one_line(dataset_files.read_cifar_folder, str(tmp_path), "cifar10", match="holds no cifar10 batches")
    assert "cifar-10-batches-py/" in msg and "cifar-10-batches-bin/" in msg


@pytest.mark.parametrize("cut", [1, 3072, 3073 * 2 + 5])
def test_truncated_or_wrong_record_size_binary_batch(tmp_path, cut):
    write_cifar10(tmp_path, "bin")
    path = tmp_path / "data_batch_2.bin"
    path.write_bytes(path.read_bytes()[:-cut] if cut < 3073 * 2 else b"\0" * cut)
    one_line(dataset_files.read_cifar_folder, str(tmp_path), "cifar10",
             match="not a whole number of 3073-byte records")


def test_cifar100_binary_batch_read_as_cifar10_is_refused(tmp_path):
    path = tmp_path / "b.bin"
    write_binary_batch(path, cifar_images(3073, 0)[:1], [np.array([1]), np.array([2])])  # one 3074-byte record
    one_line(dataset_files.read_cifar_binary, str(path), 1, 0, match="3073-byte records")


@pytest.mark.parametrize("payload,match", [
    (b"", "not a CIFAR python batch"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}, protocol=2)[:-20],
     "not a CIFAR python batch"),
    (pickle.dumps([1, 2, 3]), "holds a list, not a dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "no 'labels' entry"),
    (pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [1, 2]}), "not N x 3072 uint8"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}), "not N x 3072 uint8"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}), "2 images but 1 'labels'"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}), "not a list of integer"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [[1], [2, 3]]}), "not a list of integer"),
    (gzip.compress(b"\x80\x02}q\x00.", mtime=0), "not a CIFAR python batch"),
    (b"\xff\xfe not a pickle \xc3\x28", "not a CIFAR python batch"),
])
def test_bad_python_batches(tmp_path, payload, match):
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    one_line(dataset_files.read_cifar_pickle, str(path), "labels", match=match)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    one_line(dataset_files.read_cifar_pickle, str(path), "labels", match="refusing to load")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("payload,match", [
    (b"", "bad magic number empty"),
    (b"\x1f\x8b\x08\x00garbage", "corrupt or truncated gzip"),
    (gzip.compress(b"\xff\xfe\xfd\x00 not utf-8 \xc3\x28", mtime=0), "bad magic number fffefd00"),
    (gzip.compress(b"\x00\x00\x08\x03\x00\x00", mtime=0), "IDX header is truncated"),
    (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02", "holds 2 data bytes but its header says 5"),
    (b"\x00\x00\x08\x03" + (2 ** 32 - 1).to_bytes(4, "big") * 3, "header says 4294967295x4294967295x4294967295"),
    (b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"\0\0\0\0", "bad magic number 00000d01"),  # float32
])
def test_bad_idx_bytes(tmp_path, payload, match):
    path = tmp_path / "f"
    path.write_bytes(payload)
    one_line(dataset_files.read_idx, str(path), match=match)


def test_idx_with_wrong_dimensions(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") * 2 + b"\0" * 4)
    one_line(dataset_files.read_idx, str(path), 1, match="has 2 dimensions 2x2 where 1 were expected")


def test_a_folder_where_a_file_should_be(tmp_path):
    (tmp_path / "test_batch").mkdir()
    one_line(dataset_files.read_cifar_pickle, str(tmp_path / "test_batch"), "labels", match="is a folder")


# --- any bytes: arrays or the one-line DataError, never another exception ----------------------

IDX_HEADERS = st.sampled_from([b"", b"\x00\x00\x08\x01", b"\x00\x00\x08\x03", b"\x00\x00\x08\x00"])
RANDOM_BYTES = st.binary(max_size=300)
# Valid batches of 0..2 records; below also truncated, or with one byte changed.
VALID_PICKLES = st.integers(0, 2).map(lambda n: pickle.dumps(
    {b"data": np.full((n, 3072), 7, np.uint8), b"labels": list(range(n))}, protocol=2))


def feed(tmp_path_factory, payload, reader):
    path = tmp_path_factory.mktemp("bytes") / "file"
    path.write_bytes(payload)
    try:
        result = reader(str(path))
    except DataError as e:
        assert "\n" not in str(e)
        return None
    return result


@settings(deadline=None, derandomize=True, max_examples=150)
@given(header=IDX_HEADERS, body=RANDOM_BYTES, compress=st.booleans())
def test_any_bytes_to_read_idx(tmp_path_factory, header, body, compress):
    payload = gzip.compress(header + body) if compress else header + body
    array = feed(tmp_path_factory, payload, dataset_files.read_idx)
    if array is not None:
        assert array.dtype == np.uint8 and array.size == len(header + body) - 4 - 4 * array.ndim


@settings(deadline=None, derandomize=True, max_examples=150)
@given(payload=st.one_of(RANDOM_BYTES, RANDOM_BYTES.map(lambda b: b"\x80\x02" + b), VALID_PICKLES,
                         st.tuples(VALID_PICKLES, st.integers(0, 400)).map(lambda p: p[0][:p[1]]),
                         st.tuples(VALID_PICKLES, st.integers(0, 400), st.integers(0, 255)).map(
                             lambda p: p[0][:p[1]] + bytes([p[2]]) + p[0][p[1] + 1:])))
def test_any_bytes_to_read_cifar_pickle(tmp_path_factory, payload):
    result = feed(tmp_path_factory, payload, lambda path: dataset_files.read_cifar_pickle(path, "labels"))
    if result is not None:
        images, labels = result
        assert images.shape[1:] == (32, 32, 3) and len(images) == len(labels)


@settings(deadline=None, derandomize=True, max_examples=100)
@given(payload=st.one_of(RANDOM_BYTES, st.integers(1, 3).map(lambda n: bytes(range(256)) * 12 * n + b"\x07" * n)),
       label_bytes=st.sampled_from([1, 2]))
def test_any_bytes_to_read_cifar_binary(tmp_path_factory, payload, label_bytes):
    result = feed(tmp_path_factory, payload, lambda path: dataset_files.read_cifar_binary(path, label_bytes, 0))
    if result is not None:
        images, labels = result
        assert len(payload) % (label_bytes + 3072) == 0
        assert images.shape == (len(payload) // (label_bytes + 3072), 32, 32, 3) and len(labels) == len(images)
