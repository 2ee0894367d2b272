"""cnn_jax.search.space: --space text and files into Optuna distributions; one-line errors."""

import json

import optuna
import pytest

from cnn_jax.config import Config, ConfigError
from cnn_jax.search import space


def test_the_documented_example_parses_into_typed_distributions():
    s = space.parse("learning_rate=loguniform(1e-4,1e-1) momentum=uniform(0.5,0.99) optimizer=adam,momentum "
                    "num_fc=int(16,64) batch_size=logint(16,128) conv_filters=8:16,20:50")
    assert s["learning_rate"] == optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    assert s["momentum"] == optuna.distributions.FloatDistribution(0.5, 0.99)
    assert s["optimizer"] == optuna.distributions.CategoricalDistribution(["adam", "momentum"])
    assert s["num_fc"] == optuna.distributions.IntDistribution(16, 64)
    assert s["batch_size"] == optuna.distributions.IntDistribution(16, 128, log=True)
    assert space.to_config_values({"conv_filters": "8:16", "num_fc": 20}) == {"conv_filters": (8, 16), "num_fc": 20}
    # describe() writes --space text that parses back into the same space.
    assert space.parse(space.describe(s)) == s


def test_files_hold_strings_lists_or_type_low_high(tmp_path):
    json_file = tmp_path / "space.json"
    json_file.write_text(json.dumps({"learning_rate": "loguniform(1e-4,1e-1)", "pool": ["max", "avg"],
                                     "momentum": {"type": "uniform", "low": 0.5, "high": 0.9}}))
    yaml_file = tmp_path / "space.yaml"
    yaml_file.write_text("learning_rate: loguniform(1e-4,1e-1)\npool: [max, avg]\n"
                         "momentum: {type: uniform, low: 0.5, high: 0.9}\n")
    expected = space.parse("learning_rate=loguniform(1e-4,1e-1) pool=max,avg momentum=uniform(0.5,0.9)")
    assert space.load_file(str(json_file)) == expected
    assert space.load_file(str(yaml_file)) == expected


@pytest.mark.parametrize("text, named", [
    ("lr=uniform(0.1,1)", "unknown field 'lr'"),
    ("learning_rate=normal(0,1)", "unknown distribution 'normal'"),
    ("learning_rate=uniform(0.1)", "give two bounds"),
    ("learning_rate=uniform(0.1,0.1)", "empty range"),
    ("learning_rate=uniform(0.5,0.1)", "empty range"),
    ("learning_rate=loguniform(-1e-3,1e-1)", "log range must lie above zero"),
    ("num_fc=logint(0,64)", "log range must lie above zero"),
    ("num_fc=uniform(1,2)", "not a float field"),
    ("momentum=int(0,1)", "not an integer field"),
    ("learning_rate=uniform(a,b)", "bounds must be numbers"),
    ("pool=max,,avg", "empty choice"),
    ("pool=max,max", "twice"),
    ("optimizer=adam,seed_sgd", "--space: optimizer=seed_sgd was renamed: use optimizer=sgd"),
    ("learning_rate", "is not name=distribution"),
    ("learning_rate=uniform(0.1,1) learning_rate=uniform(0.1,1)", "given twice"),
    ("", "empty"),
])
def test_bad_spaces_are_one_line_errors_naming_the_problem(text, named):
    with pytest.raises(ConfigError) as info:
        space.parse(text)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_bounds_and_choices_are_checked_against_the_base_config():
    space.check_against(space.parse("learning_rate=loguniform(1e-4,1e-1) pool=max,avg"), Config(), "--space")
    with pytest.raises(ConfigError, match=r"learning_rate=0.0 gives an invalid run: --learning_rate=0.0"):
        space.check_against(space.parse("learning_rate=uniform(0,1)"), Config(), "--space")
    with pytest.raises(ConfigError, match="pool=median"):
        space.check_against(space.parse("pool=max,median"), Config(), "--space")


def test_grid_lists_choices_and_integers_but_refuses_float_ranges():
    assert space.grid(space.parse("pool=max,avg num_fc=int(8,10)")) == {"pool": ["max", "avg"], "num_fc": [8, 9, 10]}
    with pytest.raises(ConfigError, match="--sampler=grid: learning_rate is a float range"):
        space.grid(space.parse("learning_rate=uniform(0.1,1)"))


def test_the_space_text_for_a_study_is_canonical():
    a = space.parse("learning_rate=loguniform(1e-4,1e-1) pool=max,avg")
    b = space.parse("pool=max,avg learning_rate=loguniform(0.0001,0.1)")
    assert space.to_json(a) == space.to_json(b)
    assert space.to_json(a) != space.to_json(space.parse("pool=max,avg learning_rate=loguniform(1e-4,1e-2)"))


# ----------------------------------------------------------------------------- --space_file on any bytes

from hypothesis import given, settings, strategies as st  # noqa: E402


@pytest.mark.parametrize("name, data, fragment", [
    ("space.json", b"", "empty"),
    ("space.yaml", b"\n", "empty"),
    ("space.json", b'{"learning_rate": "loguniform(1e-4', "not valid JSON"),
    ("space.json", b'{"pool": "m\xe4x"}', "not UTF-8 text (byte 0xe4 at offset 11)"),
    ("space.yaml", "pool: [max]\n".encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
    ("space.json", b"[1, 2]", "expected a non-empty mapping of field to distribution"),
    ("space.json", b'{"learning_rate": {"type": "uniform", "low": [1], "high": 2}}', "learning_rate"),
    ("space.json", b'{"no_such_field": [1]}', "no_such_field"),
])
def test_a_bad_space_file_is_one_line_naming_it(tmp_path, name, data, fragment):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ConfigError) as error:
        space.load_file(str(path))
    message = str(error.value)
    assert message.startswith(f"--space_file={path}") and fragment in message and "\n" not in message


def load_or_one_line(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        return space.load_file(str(path))
    except ConfigError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return None


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(data=st.binary(max_size=200), yaml=st.booleans())
def test_any_bytes_as_a_space_file_give_a_space_or_one_line(tmp_path_factory, data, yaml):
    load_or_one_line(tmp_path_factory.mktemp("space"), "space.yaml" if yaml else "space.json", data)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
space_fields = st.sampled_from(["learning_rate", "momentum", "pool", "seed", "conv_filters", "epochs", "x"])


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(value=st.dictionaries(space_fields, json_values | st.fixed_dictionaries(
    {"type": st.sampled_from(["uniform", "loguniform", "int", "logint", "other"]), "low": json_values,
     "high": json_values}), max_size=3))
def test_any_json_value_as_a_space_file_gives_a_space_or_one_line(tmp_path_factory, value):
    load_or_one_line(tmp_path_factory.mktemp("space"), "space.json", json.dumps(value).encode())


def test_the_training_techniques_are_searchable_and_checked_like_any_field():
    from cnn_jax import config as config_lib
    base = config_lib.replace(Config(), model="resnet", optimizer="momentum")
    searched = space.parse("label_smoothing=uniform(0,0.2) mixup_alpha=uniform(0,1) cutmix_alpha=0,1 "
                           "random_erasing=uniform(0,0.5) drop_path=uniform(0,0.3) grad_clip_norm=loguniform(0.1,10) "
                           "warmup_steps=int(0,100) sgd_weight_decay=off,l2,decoupled tta_flip=true,false")
    space.check_against(searched, base, "--space")
    with pytest.raises(ConfigError, match=r"^--space: label_smoothing=1.5 gives an invalid run: --label_smoothing=1.5"):
        space.check_against(space.parse("label_smoothing=uniform(0,1.5)"), base, "--space")
    with pytest.raises(ConfigError, match=r"^--space: drop_path=0.2 gives an invalid run: .*--model=cnn"):
        space.check_against(space.parse("drop_path=uniform(0,0.2)"), Config(), "--space")
