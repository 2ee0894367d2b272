"""The datasets of the registry in memory, from the first source that has them.

`load(config)` returns a `Dataset` whose images are the registry's normalisation of the
uint8 pixels (float32 in [0, 1]), shaped (N, H, W, C), and labels int32. Where the data
comes from, in this order (`find_source`; the first that applies is used, and
`Dataset.source` says which):

1. `--data_dir` (`Config.data_dir`): a folder with the dataset's offline files;
2. `$CNN_JAX_<DATASET>_DIR` (e.g. `CNN_JAX_MNIST_DIR`): the same, from the environment;
3. `$CNN_JAX_DATA_DIR/<dataset>`: a folder of datasets, one subfolder each;
4. a prepared TensorFlow Datasets copy in `$TFDS_DATA_DIR` (default `~/tensorflow_datasets`);
5. `../shared/data/<dataset>` beside the repository (this project's machines), found from
   the package's location, not the current directory;
6. the dataset's well-known system folders (e.g. Debian's `/usr/share/datasets/fashion-mnist`);
7. a TensorFlow Datasets download, when its server can be reached.

Sources 1-3 and 5-6 need no TensorFlow. Every failure is a `DataError` with a one-line
message naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import socket

import numpy as np

from cnn_jax.data import registry as datasets
from cnn_jax.config import Config, ConfigError
from cnn_jax.data.files import IDX_FILES, DataError, read_idx  # noqa: F401 - part of this module's API

CLASS_NAMES = {name: spec.class_names for name, spec in datasets.REGISTRY.items()}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The project machines keep one folder per dataset here (relative to the repository).
SHARED_DATA_DIR = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data"))
DATA_ROOT_ENV = "CNN_JAX_DATA_DIR"
TFDS_HOST = "storage.googleapis.com"  # where TFDS downloads the registry's datasets from


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train_images: np.ndarray   # (N, H, W, C) float32 in [0, 1]
    train_labels: np.ndarray   # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str = ""           # where the data came from, in words

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str       # "folder" (offline files) or "tfds"
    location: str   # the folder, or the TFDS data dir ("" for TFDS's default)
    reason: str     # how it was found, e.g. "--data_dir" or "$CNN_JAX_MNIST_DIR"

    def describe(self, name: str) -> str:
        where = self.location or "TFDS's default data dir"
        return f"{name} from {where} ({self.reason})"


def from_arrays(name: str, train_images: np.ndarray, train_labels: np.ndarray,
                test_images: np.ndarray, test_labels: np.ndarray,
                class_names: tuple[str, ...], source: str = "") -> Dataset:
    """Build a checked Dataset from uint8 images (N, H, W[, C]) and integer labels."""
    where = f"{source}: " if source else ""
    normalize = datasets.get(name).normalize if name in datasets.REGISTRY else datasets.to_unit_float
    parts = {"train": (train_images, train_labels), "test": (test_images, test_labels)}
    out = {}
    for split, (images, labels) in parts.items():
        if len(images) != len(labels):
            raise DataError(f"{where}{split} split has {len(images)} images but {len(labels)} labels; "
                            "the image and label files do not belong together")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DataError(f"{where}{split} labels range {labels.min()}..{labels.max()}, outside the "
                            f"{len(class_names)} classes of {name}; check --dataset and the label file")
        if images.ndim == 3:
            images = images[..., None]
        out[split] = (normalize(images), labels.astype(np.int32))
    if out["train"][0].shape[1:] != out["test"][0].shape[1:]:
        raise DataError(f"{where}train images are {out['train'][0].shape[1:]} but test images "
                        f"{out['test'][0].shape[1:]}; the files do not belong together")
    return Dataset(name, *out["train"], *out["test"], class_names, source)


def load_folder(folder: str, name: str = "mnist", source: str = "") -> Dataset:
    """Load dataset `name` from a folder holding its offline files (format: the registry's)."""
    spec = datasets.get(name)
    if not os.path.isdir(folder):
        raise DataError(f"--data_dir={folder}: no such directory; give the folder that holds "
                        f"{spec.file_format} of {name}")
    return from_arrays(name, class_names=spec.class_names, source=source or folder, **spec.reader(folder))


load_idx_dir = load_folder   # the MNIST-family name of `load_folder`


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:port opens (TFDS would otherwise retry for minutes)."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _without_warnings(fn):
    """`fn()` with absl log records below ERROR dropped: TFDS warns about an empty cache folder
    before the one-line DataError that says what to do."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return fn()
    finally:
        logger.setLevel(level)


def tfds_data_dir() -> str:
    """Where TensorFlow Datasets keeps prepared datasets: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def tfds_prepared(name: str, data_dir: str | None = None) -> bool:
    """Whether a prepared TFDS copy of `name` is in `data_dir` (checked on disk, without importing TFDS)."""
    tfds_name = datasets.get(name).tfds_name
    return bool(glob.glob(os.path.join(data_dir or tfds_data_dir(), tfds_name, "*", "dataset_info.json")))


def _tensorflow_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("tensorflow") is not None


def _can_prepare() -> bool:
    """Whether TFDS can prepare a dataset here: TFDS extracts downloads with TensorFlow's gfile."""
    return _tensorflow_installed()


def _tfds_arrays(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared split as (uint8 images, labels). With TensorFlow, the whole split in one batch
    (decoded by tf.data, no per-record Python); without it, TFDS's array_record data source."""
    import tensorflow_datasets as tfds
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format) or "tfrecord"
    if _tensorflow_installed() and file_format == "tfrecord":
        batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        return np.asarray(batch["image"], np.uint8), np.asarray(batch["label"], np.int64)
    source = builder.as_data_source(split=split)   # decodes record by record: the slow fallback
    records = [source[i] for i in range(len(source))]
    return (np.stack([r["image"] for r in records]).astype(np.uint8),
            np.array([r["label"] for r in records], np.int64))


def load_tfds(name: str = "mnist", data_dir: str | None = None, manual_dir: str | None = None) -> Dataset:
    """Load through TensorFlow Datasets: a prepared copy in `data_dir`, else download and prepare it
    (preparing needs TensorFlow: requirements-tfds.txt). `manual_dir` holds already downloaded
    official files (TFDS's manual download), so preparing needs no network."""
    spec = datasets.get(name)
    offline_hint = (f"pass --data_dir with {spec.file_format} (or set ${spec.env_var}); on this "
                    f"project's machines MNIST is in ../shared/data/mnist")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"tensorflow-datasets is not installed; pip install -r requirements.txt, "
                        f"or {offline_hint}") from None
    try:
        if tfds_prepared(name, data_dir):
            builder = tfds.builder(spec.tfds_name, data_dir=data_dir or tfds_data_dir())
        else:
            if manual_dir is None and not _reachable(TFDS_HOST):
                raise DataError(f"TensorFlow Datasets has no copy of {name!r} and {TFDS_HOST} cannot be "
                                f"reached (offline?); {offline_hint}")
            if not _can_prepare():
                raise DataError(f"TensorFlow Datasets needs TensorFlow to prepare {name!r}: "
                                f"pip install -r requirements-tfds.txt, or {offline_hint}")
            builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
            config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
            _without_warnings(lambda: builder.download_and_prepare(download_config=config))
        splits = {split: _tfds_arrays(builder, split) for split in ("train", "test")}
    except DataError:
        raise
    except Exception as e:  # TFDS raises many types offline (network, checksum, missing TF, ...)
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"TensorFlow Datasets could not provide {name!r} ({type(e).__name__}: "
                        f"{first_line}); {offline_hint}") from None
    return from_arrays(name, *splits["train"], *splits["test"], class_names=spec.class_names,
                       source=f"tfds:{spec.tfds_name}")


def find_source(name: str, data_dir: str = "") -> Source:
    """The first source of dataset `name` in the documented order (module docstring)."""
    spec = datasets.get(name)
    if data_dir:
        return Source("folder", data_dir, "--data_dir")
    if os.environ.get(spec.env_var):
        return Source("folder", os.environ[spec.env_var], f"${spec.env_var}")
    root = os.environ.get(DATA_ROOT_ENV)
    if root and os.path.isdir(os.path.join(root, name)):
        return Source("folder", os.path.join(root, name), f"${DATA_ROOT_ENV}/{name}")
    if tfds_prepared(name):
        return Source("tfds", tfds_data_dir(), "a prepared TensorFlow Datasets copy")
    shared = os.path.join(SHARED_DATA_DIR, name)
    if os.path.isdir(shared):
        return Source("folder", shared, "the project machines' shared copy beside the repository")
    for folder in spec.system_dirs:
        if os.path.isdir(folder):
            return Source("folder", folder, "a system-wide copy")
    if _reachable(TFDS_HOST):
        return Source("tfds", "", "a TensorFlow Datasets download")
    looked = [f"${spec.env_var}", f"${DATA_ROOT_ENV}/{name}", os.path.join(tfds_data_dir(), spec.tfds_name),
              shared, *spec.system_dirs]
    raise DataError(f"no copy of {name} found (looked in {', '.join(looked)}) and {TFDS_HOST} cannot be "
                    f"reached (offline?); pass --data_dir=FOLDER holding {spec.file_format}, or set "
                    f"${spec.env_var}=FOLDER")


def load_source(name: str, source: Source) -> Dataset:
    """Dataset `name` from `source` (see `find_source`)."""
    if source.kind == "tfds":
        dataset = load_tfds(name, data_dir=source.location or None)
    else:
        dataset = load_folder(source.location, name)
    return dataclasses.replace(dataset, source=source.describe(name))


def load(config: Config) -> Dataset:
    """The dataset `config` names, from its first source, cut to the configured subsets."""
    dataset = load_source(config.dataset, find_source(config.dataset, config.data_dir))
    if dataset.train_images.shape[1:] != tuple(config.input_shape):
        shape = ",".join(map(str, dataset.train_images.shape[1:]))
        raise DataError(f"{config.dataset} images are {dataset.train_images.shape[1:]} but "
                        f"--input_shape is {tuple(config.input_shape)}; drop --input_shape (it follows "
                        f"--dataset) or set --input_shape={shape}")
    if dataset.num_classes != config.num_classes:
        raise DataError(f"{config.dataset} has {dataset.num_classes} classes but --num_classes is "
                        f"{config.num_classes}; drop --num_classes (it follows --dataset) or set "
                        f"--num_classes={dataset.num_classes}")
    if config.train_subset or config.test_subset:
        n_train = config.train_subset or len(dataset.train_labels)
        n_test = config.test_subset or len(dataset.test_labels)
        dataset = dataclasses.replace(
            dataset, train_images=dataset.train_images[:n_train], train_labels=dataset.train_labels[:n_train],
            test_images=dataset.test_images[:n_test], test_labels=dataset.test_labels[:n_test])
    return dataset


def hold_out(dataset: Dataset, size: int) -> tuple[Dataset, np.ndarray, np.ndarray]:
    """(the dataset without its last `size` training images, those images, their labels): a
    validation split carved from the training set, which the training part never sees.

    The *last* images are held out, so a `--train_subset` keeps its first images for training.
    ConfigError unless 0 < size < the training images."""
    n = len(dataset.train_labels)
    if not 0 < size < n:
        raise ConfigError(f"--validation_size={size} is not allowed: the validation images are carved from the "
                          f"{n} training images, so give 1..{n - 1}")
    train_part = dataclasses.replace(dataset, train_images=dataset.train_images[:n - size],
                                     train_labels=dataset.train_labels[:n - size])
    return train_part, dataset.train_images[n - size:], dataset.train_labels[n - size:]


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled order of `n` training examples for `epoch`: deterministic in (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
