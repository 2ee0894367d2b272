"""Config: defaults, presets, round trip, and the one place where values are validated."""

import ast
import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cnn_jax import config as config_lib
from cnn_jax import model, models
from cnn_jax.config import Config, ConfigError
from cnn_jax.data import registry as datasets
from test_readers import PROPERTY, json_values, value_or_one_line_error


def test_defaults_are_the_tutorials_network():
    c = Config()
    assert (c.conv_filters, c.conv_kernels, c.num_fc, c.batch_size, c.epochs) == ((20, 50), (3, 5), 128, 64, 1)
    assert model.validate(c) is c


def test_tutorial_preset_is_the_tutorial():
    c = config_lib.PRESETS["tutorial"]
    assert (c.init, c.weight_scale, c.optimizer, c.learning_rate, c.loss_reduction, c.pool, c.epochs,
            c.schedule) == ("normal", 0.01, "sgd", 0.01, "sum", "avg", 1, "constant")
    model.validate(c)


@pytest.mark.parametrize("name,old,message", [
    ("init", "seed", "--init=seed was renamed: use --init=normal"),
    ("optimizer", "seed_sgd", "--optimizer=seed_sgd was renamed: use --optimizer=sgd (the tutorial's recipe "
                              "adds --loss_reduction=sum, as --preset=tutorial does)"),
])
def test_renamed_values_are_one_line_errors_naming_the_new_one(name, old, message):
    with pytest.raises(ConfigError) as info:
        model.validate(config_lib.replace(Config(), **{name: old}))
    assert str(info.value) == message
    with pytest.raises(ConfigError, match=f"^--sweep: {name}={old} was renamed: use {name}="):
        config_lib.check_renamed(name, old, "--sweep")


def test_renamed_preset_is_a_one_line_error_and_unknown_presets_are_listed():
    assert config_lib.preset("tutorial") is config_lib.PRESETS["tutorial"]
    with pytest.raises(ConfigError, match=r"^--preset=seed was renamed: use --preset=tutorial$"):
        config_lib.preset("seed")
    with pytest.raises(ConfigError, match=r"^--preset='nope' is not allowed: use one of default, fast, "):
        config_lib.preset("nope")


def test_a_config_written_with_the_old_names_is_migrated_on_read():
    old = {**config_lib.to_dict(config_lib.PRESETS["tutorial"]), "init": "seed", "optimizer": "seed_sgd"}
    assert config_lib.from_dict(old) == config_lib.PRESETS["tutorial"]
    assert config_lib.from_dict({"seed": 3, "init": "he"}) == Config(seed=3)   # the random seed stays


def test_flag_groups_hold_every_config_field_once():
    names = [name for group in config_lib.FLAG_GROUPS.values() for name in group]
    assert len(names) == len(set(names))
    assert set(names) == set(config_lib.field_names()) | {"preset", "compilation_cache", "compilation_cache_dir"}
    assert list(config_lib.FLAG_GROUPS) == ["data", "model", "optimisation", "execution", "run"]


def test_every_preset_is_valid():
    for preset in config_lib.PRESETS.values():
        model.validate(preset)


def test_presets_flip_only_images_whose_mirror_keeps_the_class():
    flipping = {name: p.dataset for name, p in config_lib.PRESETS.items() if p.augment_flip}
    assert flipping, "no preset flips: this test checks nothing"
    for name, dataset in flipping.items():
        assert datasets.get(dataset).flip_keeps_label, f"preset {name} flips {dataset}"


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
])
def test_bad_values_are_rejected_in_one_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        model.validate(config_lib.replace(Config(), **overrides))
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="unknown config field.*poool"):
        config_lib.replace(Config(), poool="max")


def test_fast_preset_trains_the_tutorials_network(mnist_dir):
    from cnn_jax import run
    from cnn_jax.models import cnn
    fast = config_lib.PRESETS["fast"]
    assert cnn.param_shapes(fast) == cnn.param_shapes(Config())   # same network, other recipe
    config = config_lib.replace(fast, data_dir=mnist_dir, train_subset=6400, test_subset=2000)
    history = run.train_and_evaluate(config)
    assert history[-1]["test_accuracy"] > 0.94   # 0.9625 after these 2 x 100 steps (full data: >= 0.99)


@pytest.mark.parametrize("overrides, fragment", [
    ({"batch_size": "x"}, "--batch_size='x' is not allowed: it must be an integer of at most 2147483647"),
    ({"batch_size": [1]}, "--batch_size=[1] is not allowed: it must be an integer"),
    ({"batch_size": 64.0}, "--batch_size=64.0 is not allowed: it must be an integer"),
    ({"epochs": True}, "--epochs=True is not allowed: it must be an integer"),
    ({"seed": 2**31}, "--seed=2147483648 is not allowed: it must be an integer of at most 2147483647"),
    ({"learning_rate": "x"}, "--learning_rate='x' is not allowed: it must be a number"),
    ({"learning_rate": None}, "--learning_rate=None is not allowed: it must be a number"),
    ({"learning_rate": 10**400}, "--learning_rate=1000000000000000"),
    ({"momentum": False}, "--momentum=False is not allowed: it must be a number"),
    ({"debug": 1}, "--debug=1 is not allowed: it must be true or false"),
    ({"debug": "true"}, "--debug='true' is not allowed: it must be true or false"),
    ({"data_dir": 5}, "--data_dir=5 is not allowed: it must be a string"),
    ({"data_dir": "mnist\0"}, "--data_dir='mnist\\x00' is not allowed: it must be a string (without NUL"),
    ({"coordinator_address": {}}, "--coordinator_address={} is not allowed: it must be a string"),
    ({"pool": ["max"]}, "--pool=['max'] is not allowed: it must be a string"),
    ({"pool": "m" * 1000}, "--pool='mmmmmmmmmmmmmmmmmmmm"),
    ({"conv_filters": "20,50"}, "--conv_filters='20,50' is not allowed: it must be a list of integers"),
    ({"conv_filters": (20, "50")}, "--conv_filters=(20, '50') is not allowed: it must be a list of integers"),
    ({"conv_filters": (20, [50])}, "must be a list of integers"),
    ({"conv_kernels": (3, 5.0)}, "--conv_kernels=(3, 5.0) is not allowed"),
    ({"input_shape": ("a", "b", "c")}, "--input_shape=('a', 'b', 'c') is not allowed"),
    ({"input_shape": (28, 28, 2**40)}, "--input_shape=(28, 28, 1099511627776) is not allowed"),
])
def test_values_of_the_wrong_type_are_one_line_errors_not_type_errors(overrides, fragment):
    """A config read from JSON or built in Python may hold any value: `validate` refuses each in one line."""
    with pytest.raises(ConfigError) as info:
        model.validate(config_lib.replace(Config(), **overrides))
    assert fragment in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 200, info.value


def test_a_float_field_takes_an_integer():
    assert model.validate(config_lib.replace(Config(), learning_rate=1, momentum=0)).learning_rate == 1


@pytest.mark.parametrize("values, fragment", [
    ({"conv_filters": [[20], [50]]}, "--conv_filters=([20], [50]) is not allowed"),
    ({"num_fc": {"a": 1}}, "--num_fc={'a': 1} is not allowed"),
    ({"learning_rate": "0.001"}, "--learning_rate='0.001' is not allowed: it must be a number"),
])
def test_from_dict_then_validate_refuses_json_of_the_wrong_shape(values, fragment):
    with pytest.raises(ConfigError) as info:
        model.validate(config_lib.from_dict({**config_lib.to_dict(Config()), **values}))
    assert fragment in str(info.value)


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from(config_lib.field_names()), json_values, min_size=1, max_size=3))
def test_any_json_values_for_config_fields_give_a_valid_config_or_one_line(changes):
    """What `workdir.read_config` does with a config.json whose values were edited."""
    values = {**config_lib.to_dict(Config()), **changes}
    config = value_or_one_line_error(lambda: model.validate(config_lib.from_dict(values)))
    if config is not None:   # a valid config: every field has its type
        for name, default in config_lib.to_dict(Config()).items():
            value = getattr(config, name)
            assert isinstance(value, tuple if isinstance(default, list) else type(default)) or \
                (isinstance(default, float) and type(value) is int), (name, value)


def test_each_field_is_described_once_where_it_is_declared():
    for f in dataclasses.fields(Config):
        assert f.metadata["help"].strip() and f.metadata["group"] in config_lib.GROUPS, f.name
        assert set(f.metadata["roles"]) <= set(config_lib.ROLES), f.name
    with pytest.raises(ValueError, match="group"):
        config_lib.field(0, help="x", group="misc")
    with pytest.raises(ValueError, match="roles"):
        config_lib.field(0, help="x", group="run", roles=("per_runs",))


def test_derived_field_sets_are_the_ones_written_out_before():
    """The sets each module kept by hand until the fields declared their roles, pinned as they were."""
    from cnn_jax import sweep
    from cnn_jax.engine import optim
    from cnn_jax.rundir import workdir
    assert config_lib.FLAG_GROUPS == {
        # random_erasing ... cutmix_alpha: added with the training techniques (all off by default).
        "data": ("dataset", "data_dir", "train_subset", "test_subset", "augment_shift", "augment_flip",
                 "random_erasing", "random_erasing_min_area", "random_erasing_max_area", "random_erasing_fill",
                 "mixup_alpha", "cutmix_alpha"),
        "model": ("model", "conv_filters", "conv_kernels", "conv_stride", "conv_padding", "pool", "pool_window",
                  "pool_stride", "num_fc", "num_classes", "input_shape", "init", "weight_scale", "widths", "depth",
                  "dropout", "bn_momentum", "drop_path"),   # drop_path: added with the training techniques
        # ema_decay: added with the field; warmup_steps, sgd_weight_decay, grad_clip_norm, label_smoothing:
        # added with the training techniques.
        "optimisation": ("optimizer", "learning_rate", "schedule", "warmup_steps", "momentum", "weight_decay",
                         "sgd_weight_decay", "grad_clip_norm", "ema_decay", "label_smoothing", "loss_reduction",
                         "batch_size", "epochs", "seed"),
        "execution": ("conv_impl", "loop", "pool_impl", "layout", "compute_dtype", "ynnpack",   # compute_dtype: added
                      "coordinator_address", "num_processes", "process_id", "eval_batch_size", "compilation_cache",
                      "compilation_cache_dir"),
        # tta_flip: added with the training techniques.
        "run": ("preset", "train_eval", "tta_flip", "loss_smoothing", "log_every", "debug"),
    }
    assert workdir.RESUMABLE_FIELDS == frozenset({
        "epochs", "data_dir", "log_every", "eval_batch_size", "debug", "train_eval", "loop", "conv_impl", "pool_impl",
        "layout", "coordinator_address", "num_processes", "process_id"})
    assert optim.HYPERPARAMS == ("learning_rate", "momentum", "weight_decay")
    assert sweep.PER_RUN_FIELDS == ("learning_rate", "momentum", "weight_decay", "weight_scale", "seed",
                                    "loss_smoothing", "log_every")
    # The same fields as before; declaration order puts num_classes before input_shape (data_key's
    # tuple is only compared with itself).
    assert set(sweep.DATA_FIELDS) == {"dataset", "data_dir", "train_subset", "test_subset", "input_shape",
                                      "num_classes"}
    assert sweep.DATA_FIELDS == config_lib.fields_with_role("data")
    with pytest.raises(ValueError, match="role"):
        config_lib.fields_with_role("nope")


def listed_choices(help_text):
    """The `a, b or c` list of a help text, with every (parenthesised note) taken out."""
    while re.search(r"\([^()]*\)", help_text):
        help_text = re.sub(r"\s*\([^()]*\)", "", help_text)
    match = re.search(r"((?:\w+, )*\w+ or \w+)", help_text)
    return tuple(re.split(r", | or ", match.group(1))) if match else ()


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Config) if f.metadata["choices"]])
def test_help_lists_exactly_the_choices_validate_takes(name):
    choices = next(f.metadata["choices"] for f in dataclasses.fields(Config) if f.name == name)
    assert listed_choices(next(f.metadata["help"] for f in dataclasses.fields(Config) if f.name == name)) == choices
    with pytest.raises(ConfigError) as info:
        model.validate(config_lib.replace(Config(), **{name: "bogus"}))
    assert str(info.value) == f"--{name}='bogus' is not allowed: use one of {', '.join(choices)}"


def test_choice_tuples_are_their_registries():
    from cnn_jax.nn import layers
    assert config_lib.DATASETS == datasets.NAMES
    assert config_lib.PADDINGS == layers.PADDINGS and config_lib.POOLS == tuple(layers.POOLS)
    help_text = next(f.metadata["help"] for f in dataclasses.fields(Config) if f.name == "model")
    assert listed_choices(help_text.format(names=config_lib.one_of(models.names()))) == models.names()


def test_config_imports_nothing_above_it():
    """Only the dataset registry, a leaf: the families' checks are composed in `model.validate`."""
    tree = ast.parse(open(config_lib.__file__).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | \
        {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {name for name in imported if name and name.startswith("cnn_jax")} == {"cnn_jax.data"}


def test_the_tutorial_cnns_fields_are_checked_by_its_family_only():
    vgg = config_lib.replace(config_lib.PRESETS["vgg"], pool="min", conv_padding="FULL", conv_stride=0,
                             pool_window=3, pool_impl="reshape", num_fc=0)
    assert model.validate(vgg) is vgg
    cnn = config_lib.replace(vgg, model="cnn", widths=Config().widths)
    assert config_lib.validate(cnn) is cnn
    with pytest.raises(ConfigError, match=r"^--pool='min' is not allowed: use one of max, avg$"):
        model.validate(cnn)
