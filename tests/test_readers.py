"""Reading files back: any bytes give a value or one line of ConfigError naming the file.

Besides the explicit cases, property-based tests (hypothesis, derandomized: the same
examples on every run) feed random bytes, damaged good files and random JSON values to the
readers. The helpers here (`json_values`, `damaged`, `value_or_one_line_error`) are shared
by the tests of the modules whose files they read (workdir, sweep, checkpoint).
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnn_jax import cli
from cnn_jax.config import ConfigError
from cnn_jax.rundir import readers

FIX = "restore the file"

# Fast and the same on every run: derandomized, no example database, no deadline (CI machines vary).
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 3)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=12)


@st.composite
def damaged(draw, good: bytes) -> bytes:
    """`good` damaged the ways disks and editors damage files: cut short, a byte changed,
    bytes that are not UTF-8 inserted, or replaced by random bytes."""
    how = draw(st.sampled_from(["truncate", "flip", "insert", "random"]))
    if how == "truncate":
        return good[:draw(st.integers(0, max(0, len(good) - 1)))]
    if how == "random":
        return draw(st.binary(max_size=300))
    at = draw(st.integers(0, max(0, len(good) - 1)))
    if how == "flip":
        return good[:at] + bytes([draw(st.integers(0, 255))]) + good[at + 1:]
    return good[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\x80\x80", b"\xed\xa0\x80"])) + good[at:]


def value_or_one_line_error(call, path=None):
    """`call()`'s value, or None when it raised one of the errors `cli.main_guard` prints as one
    line (checked: one line, naming `path`). Any other exception fails the test."""
    try:
        return call()
    except cli.user_errors() as e:
        message = str(e)
        assert len(message.splitlines()) == 1 and message == message.strip(), message
        if path is not None:
            assert str(path) in message, message
        return None


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


# ----------------------------------------------------------------------------- explicit cases


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty"),
    (b" \n\t\r\n", "empty"),
    (b'{"a": 1', "not valid JSON (Expecting ',' delimiter: column 8)"),
    (b'{"a": 1}\n{"b"', "not valid JSON (Extra data: line 2 column 1)"),
    (b"\xff\xfe{}", "not UTF-8 text (byte 0xff at offset 0)"),
    (b'{"a": "caf\xe9"}', "not UTF-8 text (byte 0xe9 at offset 10)"),
    (b"\xef\xbb\xbf{}", "Unexpected UTF-8 BOM"),
    (b'{"a": NaN}', "NaN is not a JSON number"),
    (b"[-Infinity]", "-Infinity is not a JSON number"),
    (b"[" * 100_000, "nested too deeply"),
    (b"1" * 5000 + b"x", "not valid JSON ("),   # Python >= 3.11 refuses the digits, any other the "x"
    (b"\x00", "not valid JSON"),
], ids=["empty", "blank", "truncated", "two_values", "utf16", "latin1", "bom", "nan", "infinity", "deep",
        "long_int", "nul"])
def test_bad_bytes_are_one_line_naming_the_file_what_and_how(tmp_path, data, fragment):
    path = write(tmp_path / "x.json", data)
    with pytest.raises(ConfigError) as error:
        readers.read_json(path, fix=FIX)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and fragment in message and message.endswith(f"; {FIX}"), message
    assert "\n" not in message


def test_a_missing_file_or_a_folder_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"none.json: cannot read \(No such file or directory\); restore"):
        readers.read_json(str(tmp_path / "none.json"), fix=FIX)
    with pytest.raises(ConfigError, match=r"cannot read \(Is a directory\)"):
        readers.read_json(str(tmp_path), fix=FIX)


def test_good_json_and_json_lines_are_read(tmp_path):
    assert readers.read_json(write(tmp_path / "a.json", '{"a": [1, 2.5, null, "\u00e9"]}\n')) == \
        {"a": [1, 2.5, None, "\u00e9"]}
    path = write(tmp_path / "m.jsonl", '{"a": 1}\r\n\n  \n[2]\n')
    assert readers.read_json_lines(path, FIX) == [(1, {"a": 1}), (4, [2])]
    assert readers.read_json_lines(write(tmp_path / "e.jsonl", ""), FIX) == []
    with pytest.raises(ConfigError, match=r"m.jsonl: line 2: not valid JSON \(Expecting value: column 1\)"):
        readers.read_json_lines(write(tmp_path / "m.jsonl", '{"a": 1}\n]\n'), FIX)


@pytest.mark.parametrize("text, fragment", [
    ("a: [1\n", "not valid YAML"),
    ("a: !!python/object:os.system ls\n", "not valid YAML"),
    ("a: 2024-01-01\n", "holds datetime.date(2024, 1, 1), a date"),
    ("a: 2024-13-45\n", "not valid YAML"),
    ("{[1, 2]: 3}\n", "not valid YAML"),
    ("{1: 3}\n", "has a key 1 that is not a string"),
    ("a: !!binary aGk=\n", "a bytes"),
    ("a: !!set {x: null}\n", "a set"),
    ("a: &a0 [1, 2]\n" + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7)),
     "holds more than 100000 values"),
])
def test_yaml_that_is_not_plain_json_values_is_one_line(tmp_path, text, fragment):
    path = write(tmp_path / "s.yaml", text)
    with pytest.raises(ConfigError) as error:
        readers.read_yaml(path, fix=FIX)
    assert fragment in str(error.value) and str(error.value).startswith(path) and "\n" not in str(error.value)


def test_fields_are_checked_by_kind():
    fields = {"step": readers.COUNT, "loss": readers.NUMBER, "kind": readers.one_of("train", "epoch"),
              "losses": readers.list_of(readers.NUMBER)}
    good = {"step": 3, "loss": 0.5, "kind": "train", "losses": [1, 2.5], "other": object()}
    assert readers.check_fields(good, fields, "f", FIX) is good
    for change, fragment in [({"step": -1}, '"step" is -1, not a whole number >= 0'),
                             ({"step": True}, '"step" is True, not a whole number >= 0'),
                             ({"step": 2.0}, '"step" is 2.0'),
                             ({"loss": "0.5"}, "\"loss\" is '0.5', not a finite number"),
                             ({"loss": 10 ** 400}, '"loss" is 1000000000000000'),
                             ({"kind": "Train"}, '"kind" is \'Train\', not one of "train", "epoch"'),
                             ({"kind": 1}, "not one of"),
                             ({"losses": [1, None]}, "not a list of finite numbers")]:
        with pytest.raises(ConfigError, match="^f: ") as error:
            readers.check_fields({**good, **change}, fields, "f", FIX)
        assert fragment in str(error.value) and str(error.value).endswith(FIX) and len(str(error.value)) < 200
    with pytest.raises(ConfigError, match='^f: no "loss" field; restore the file$'):
        readers.check_fields({"step": 1}, fields, "f", FIX)
    with pytest.raises(ConfigError, match="^f: expected a JSON object, found a list of 2 values; restore"):
        readers.check_fields([1, 2], fields, "f", FIX)


def test_long_values_are_cut_in_messages():
    with pytest.raises(ConfigError) as error:
        readers.check_fields({"a": "x" * 10_000}, {"a": readers.NUMBER}, "f", FIX)
    assert len(str(error.value)) < 150 and "xxx..." in str(error.value)


# ----------------------------------------------------------------------------- properties


@PROPERTY
@given(data=st.binary(max_size=300) | damaged(b'{"pool": "max", "conv_filters": [20, 50], "rate": 0.001}\n'))
def test_any_bytes_read_as_json_give_a_value_or_one_line(tmp_path, data):
    path = write(tmp_path / "x.json", data)
    value = value_or_one_line_error(lambda: readers.read_json(path, fix=FIX), path)
    if value is not None:
        assert json.loads(data.decode("utf-8")) == value


@PROPERTY
@given(data=st.binary(max_size=300) | damaged(b"learning_rate: [0.01, 0.1]\nseed: [0, 1]\n"))
def test_any_bytes_read_as_yaml_give_plain_values_or_one_line(tmp_path, data):
    path = write(tmp_path / "x.yaml", data)
    value = value_or_one_line_error(lambda: readers.read_yaml(path, fix=FIX), path)
    json.dumps(value)   # plain JSON values only


@PROPERTY
@given(value=json_values)
def test_any_json_value_passes_or_fails_a_field_check_in_one_line(value):
    fields = {"step": readers.COUNT, "loss": readers.NUMBER_OR_NULL, "name": readers.TEXT}
    record = value_or_one_line_error(lambda: readers.check_fields(value, fields, "f.json", FIX), "f.json")
    if record is not None:
        assert isinstance(record["step"], int) and isinstance(record["name"], str)
