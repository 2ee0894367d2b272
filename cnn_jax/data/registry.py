"""The dataset registry: one entry per dataset, everything the code needs to know about it.

An entry names the dataset's TensorFlow Datasets builder, its offline file format and the
reader for it (`cnn_jax.data.files`), its image shape, classes and normalisation, and
where offline copies are looked for. `Config.input_shape` and `Config.num_classes` follow
the entry of `Config.dataset`. Adding a dataset is adding an entry (and a reader if its
files have a new format).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from cnn_jax.data import files as dataset_files


def to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]: exactly `images.astype(np.float32) / 255`, through a 256-entry
    table: one pass and no float temporary, faster and lighter than the division on a whole dataset."""
    if images.dtype != np.uint8:
        return images.astype(np.float32) / 255.0
    return _UNIT_FLOAT[images]


_UNIT_FLOAT = np.arange(256, dtype=np.float32) / 255.0


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str                               # the --dataset value
    tfds_name: str                          # TensorFlow Datasets builder
    file_format: str                        # the offline files, in words (for messages and docs)
    reader: Callable[[str], dataset_files.Arrays]   # folder -> uint8 arrays (N, H, W, C), labels
    image_shape: tuple[int, int, int]       # H, W, C
    class_names: tuple[str, ...]
    normalize: Callable[[np.ndarray], np.ndarray] = to_unit_float   # uint8 images -> model input
    system_dirs: tuple[str, ...] = ()       # well-known system folders holding the offline files
    flip_keeps_label: bool = False          # a left-right mirror image has the same class (not digits)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def env_var(self) -> str:
        """The environment variable that may point at this dataset's offline folder."""
        return f"CNN_JAX_{self.name.upper()}_DIR"


IDX_FORMAT = ("the four IDX files " + ", ".join(stem + ".gz" for stem in dataset_files.IDX_FILES.values())
              + " (.gz or raw)")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100's fine labels, in label order (the `fine_label_names` of its meta file).
CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
worm""".split())

REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("mnist", "mnist", IDX_FORMAT, dataset_files.read_idx_folder, (28, 28, 1),
                tuple(str(d) for d in range(10))),
    DatasetSpec("fashion_mnist", "fashion_mnist", IDX_FORMAT, dataset_files.read_idx_folder, (28, 28, 1),
                ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
                system_dirs=("/usr/share/datasets/fashion-mnist",), flip_keeps_label=True),   # Debian's dataset-fashion-mnist
    # Kuzushiji-MNIST: ten cursive hiragana, romanised.
    DatasetSpec("kmnist", "kmnist", IDX_FORMAT, dataset_files.read_idx_folder, (28, 28, 1),
                ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
    DatasetSpec("cifar10", "cifar10",
                "CIFAR-10's python batches (cifar-10-batches-py/) or binary batches (cifar-10-batches-bin/)",
                lambda folder: dataset_files.read_cifar_folder(folder, "cifar10"), (32, 32, 3),
                CIFAR10_CLASSES, flip_keeps_label=True),
    DatasetSpec("cifar100", "cifar100",
                "CIFAR-100's python batches (cifar-100-python/) or binary batches (cifar-100-binary/); "
                "fine labels",
                lambda folder: dataset_files.read_cifar_folder(folder, "cifar100"), (32, 32, 3),
                CIFAR100_CLASSES, flip_keeps_label=True),
)}
NAMES = tuple(REGISTRY)


def get(name: str) -> DatasetSpec:
    """The registry entry of `name` (a name not in the registry is a KeyError)."""
    return REGISTRY[name]
