"""The dataset registry: its entries, and the config fields that follow them."""

import pytest

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.data import registry as datasets
from cnn_jax.config import Config


def test_the_registered_datasets():
    assert datasets.NAMES == ("mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100")
    assert config_lib.DATASETS == datasets.NAMES
    shapes = {name: (spec.image_shape, spec.num_classes) for name, spec in datasets.REGISTRY.items()}
    assert shapes == {"mnist": ((28, 28, 1), 10), "fashion_mnist": ((28, 28, 1), 10), "kmnist": ((28, 28, 1), 10),
                      "cifar10": ((32, 32, 3), 10), "cifar100": ((32, 32, 3), 100)}
    for spec in datasets.REGISTRY.values():
        assert len(set(spec.class_names)) == spec.num_classes and spec.tfds_name == spec.name
    assert datasets.get("cifar100").class_names[:3] == ("apple", "aquarium_fish", "baby")
    assert datasets.get("cifar100").class_names[-1] == "worm"
    assert datasets.get("cifar10").class_names[9] == "truck"
    assert datasets.get("kmnist").env_var == "CNN_JAX_KMNIST_DIR"
    flips = {name for name, spec in datasets.REGISTRY.items() if spec.flip_keeps_label}
    assert flips == {"fashion_mnist", "cifar10", "cifar100"}   # not digits nor kana


@pytest.mark.parametrize("name", datasets.NAMES)
def test_shape_and_classes_follow_the_dataset_and_the_default_network_fits(name):
    config = model.validate(config_lib.replace(Config(), dataset=name))
    spec = datasets.get(name)
    assert config.input_shape == spec.image_shape and config.num_classes == spec.num_classes
    # and back: from CIFAR to MNIST the shape follows again
    back = config_lib.replace(config, dataset="mnist")
    assert back.input_shape == (28, 28, 1) and back.num_classes == 10


def test_given_shape_or_classes_win_and_other_changes_keep_them():
    config = config_lib.replace(Config(), dataset="cifar100", num_classes=7)
    assert config.num_classes == 7 and config.input_shape == (32, 32, 3)
    kept = config_lib.replace(config, epochs=3)
    assert kept.num_classes == 7
    assert config_lib.replace(Config(), input_shape=(30, 30, 1)).input_shape == (30, 30, 1)


def test_an_old_config_json_still_loads():
    """config.json written before the registry: mnist with explicit shape and classes."""
    old = config_lib.to_dict(Config())
    assert model.validate(config_lib.from_dict(old)) == Config()


def test_unit_float_normalisation_is_exactly_divide_by_255():
    import numpy as np
    every = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(datasets.to_unit_float(every), every.astype(np.float32) / 255)
