"""Config: defaults, presets, round trip, and the one place where values are validated."""

import pytest

from cnn_jax import config as config_lib
from cnn_jax.config import Config, ConfigError


def test_defaults_are_the_seed_network():
    c = Config()
    assert (c.conv_filters, c.conv_kernels, c.num_fc, c.batch_size, c.epochs) == ((20, 50), (3, 5), 128, 64, 1)
    assert config_lib.validate(c) is c


def test_seed_preset_is_the_tutorial():
    c = config_lib.PRESETS["seed"]
    assert (c.init, c.weight_scale, c.optimizer, c.learning_rate, c.loss_reduction, c.pool, c.epochs) == \
        ("seed", 0.01, "seed_sgd", 0.01, "sum", "avg", 1)
    config_lib.validate(c)


def test_every_preset_is_valid():
    for preset in config_lib.PRESETS.values():
        config_lib.validate(preset)


def test_dict_round_trip():
    c = config_lib.replace(Config(), conv_filters=(4, 8), pool="avg")
    assert config_lib.from_dict(config_lib.to_dict(c)) == c


@pytest.mark.parametrize("overrides,fragment", [
    ({"pool": "min"}, "--pool='min' is not allowed: use one of max, avg"),
    ({"optimizer": "rmsprop"}, "--optimizer='rmsprop'"),
    ({"dataset": "svhn"}, "--dataset='svhn' is not allowed: use one of mnist, fashion_mnist, kmnist, cifar10, cifar100"),
    ({"init": "xavier"}, "--init='xavier'"),
    ({"batch_size": 0}, "--batch_size=0"),
    ({"epochs": -1}, "--epochs=-1"),
    ({"learning_rate": 0.0}, "--learning_rate=0.0"),
    ({"learning_rate": float("nan")}, "--learning_rate=nan"),
    ({"learning_rate": float("inf")}, "--learning_rate=inf is not allowed: it must be positive and finite"),
    ({"momentum": float("inf")}, "--momentum=inf"),
    ({"weight_scale": -0.1}, "--weight_scale=-0.1"),
    ({"num_fc": 0}, "--num_fc=0"),
    ({"conv_filters": (20,)}, "differ in length"),
    ({"conv_filters": (20, 0)}, "--conv_filters=20,0"),
    ({"conv_kernels": (3, 30)}, "conv2 kernel 30 is larger than its 13x13 input"),
    ({"conv_kernels": (29, 5)}, "conv1 kernel 29 is larger than its 28x28 input"),
    ({"conv_filters": (8, 8, 8), "conv_kernels": (5, 5, 4)}, "flattened size would be zero"),
    ({"conv_filters": (8, 8, 8, 8), "conv_kernels": (3, 3, 3, 3)}, "conv4 kernel 3 is larger than its 1x1 input"),
    ({"loss_smoothing": 0.0}, "--loss_smoothing=0.0"),
    ({"schedule": "cosine", "optimizer": "seed_sgd"}, "--schedule='cosine'"),
])
def test_bad_values_are_rejected_in_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        config_lib.validate(config_lib.replace(Config(), **overrides))
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="unknown config field.*poool"):
        config_lib.replace(Config(), poool="max")


def test_fast_preset_trains_the_seed_network(mnist_dir):
    from cnn_jax import model, train
    fast = config_lib.PRESETS["fast"]
    assert model.param_shapes(fast) == model.param_shapes(Config())   # same network, other recipe
    config = config_lib.replace(fast, data_dir=mnist_dir, train_subset=6400, test_subset=2000)
    history = train.train_and_evaluate(config)
    assert history[-1]["test_accuracy"] > 0.92   # 0.944 after these 100 steps (the full epoch: >= 0.99)
