"""Reading the files the project reads back: any bytes give a checked value or one line of ConfigError.

config.json, metrics.jsonl, a sweep's `sweep_result.json` and `--sweep_file` specs are read
with these functions, and a checkpoint's meta item (read by orbax) is checked with them. Each step can fail, and each failure
is a `ConfigError` whose message is one line naming the file, what is wrong with it and
how to fix it (`fix`, given by the caller, who knows what the file is for):

    bytes   cannot be read, empty
    text    not UTF-8
    value   not JSON (or YAML), nested too deeply, NaN/Infinity (not JSON: the project never writes them)
    shape   not the type the file must hold, a field missing or of the wrong kind (`check_fields`)

A file that passes holds plain JSON values (dict with str keys, list, str, int, float,
bool, None) of the checked shape, so its consumers index it without further checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping

from cnn_jax.config import ConfigError, shown

JSON_SPACE = " \t\r\n"
# Nodes a YAML document may expand to (aliases can make a small file a huge tree).
MAX_NODES = 100_000


def fail(where: str, what: str, fix: str) -> ConfigError:
    """The one-line error for file `where`: what is wrong, then how to fix it."""
    return ConfigError(f"{where}: {what}; {fix}" if fix else f"{where}: {what}")


def read_bytes(path: str, where: str, fix: str) -> bytes:
    """The bytes of `path`; a missing or unreadable file is a one-line error."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise fail(where, f"cannot read ({e.strerror or type(e).__name__})", fix) from None


def decode(data: bytes, where: str, fix: str) -> str:
    """`data` as UTF-8 text; other bytes are a one-line error naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(where, f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})", fix) from None


def read_text(path: str, where: str | None = None, fix: str = "", allow_empty: bool = False) -> str:
    """The UTF-8 text of `path` (`where` names it in errors; default: the path)."""
    where = where or path
    text = decode(read_bytes(path, where, fix), where, fix)
    if not allow_empty and not text.strip(JSON_SPACE):
        raise fail(where, "empty", fix)
    return text


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, where: str, fix: str) -> Any:
    """The JSON value in `text` (strict: no NaN or Infinity)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        at = f"column {e.colno}" if "\n" not in text else f"line {e.lineno} column {e.colno}"
        raise fail(where, f"not valid JSON ({e.msg}: {at})", fix) from None
    except ValueError as e:   # NaN/Infinity, an integer of more digits than Python converts
        what = _first_line(e).split("; use sys.set_int_max_str_digits")[0]
        raise fail(where, f"not valid JSON ({what})", fix) from None
    except RecursionError:
        raise fail(where, "not valid JSON (nested too deeply)", fix) from None


def read_json(path: str, where: str | None = None, fix: str = "") -> Any:
    """The JSON value of file `path`."""
    where = where or path
    return parse_json(read_text(path, where, fix), where, fix)


def read_json_lines(path: str, fix: str) -> list[tuple[int, Any]]:
    """(line number, JSON value) of every non-blank line of `path` (an empty file has none)."""
    text = read_text(path, path, fix, allow_empty=True)
    return [(number, parse_json(line, f"{path}: line {number}", fix))
            for number, line in enumerate(text.split("\n"), start=1) if line.strip(JSON_SPACE)]


def read_yaml(path: str, where: str | None = None, fix: str = "") -> Any:
    """The value of a YAML file (JSON is YAML too), checked to be plain JSON values."""
    import yaml

    where = where or path
    text = read_text(path, where, fix)
    try:
        value = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError, and ValueError/RecursionError from its constructors
        raise fail(where, f"not valid YAML ({_first_line(e)})", fix) from None
    check_plain(value, where, fix)
    return value


def check_plain(value: Any, where: str, fix: str) -> None:
    """Refuse what YAML has but JSON has not (dates, binary, sets, non-string keys) and huge trees."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise fail(where, f"holds more than {MAX_NODES} values", fix)
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    raise fail(where, f"has a key {shown(key)} that is not a string", fix)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise fail(where, f"holds {shown(item)}, a {type(item).__name__}: only numbers, strings, "
                              "true/false, null, lists and mappings are allowed", fix)


def _first_line(error: BaseException) -> str:
    return shown((str(error).strip().splitlines() or [type(error).__name__])[0], 160, quote=False)


# ----------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a field must hold: a description for the message and a test."""

    name: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:   # an int too large for a float
        return False


COUNT = Kind("a whole number >= 0", lambda v: _is_int(v) and 0 <= v < 2**63)
POSITIVE = Kind("a whole number >= 1", lambda v: _is_int(v) and 1 <= v < 2**63)
NUMBER = Kind("a finite number", _is_number)
NUMBER_OR_NULL = Kind("a finite number or null", lambda v: v is None or _is_number(v))
TEXT = Kind("a string", lambda v: isinstance(v, str))
OBJECT = Kind("a JSON object", lambda v: isinstance(v, dict))


def one_of(*values: Any) -> Kind:
    return Kind("one of " + ", ".join(json.dumps(v) for v in values),
                lambda v: any(type(v) is type(w) and v == w for w in values))


def list_of(kind: Kind) -> Kind:
    return Kind(f"a list of {kind.name.removeprefix('a ').removeprefix('an ')}s",
                lambda v: isinstance(v, list) and all(kind.accepts(x) for x in v))


def record_of(fields: Mapping[str, Kind], name: str) -> Kind:
    """An object holding `fields`, each of its kind."""
    return Kind(f"an {name}" if name[0] in "aeiou" else f"a {name}",
                lambda v: isinstance(v, dict) and all(f in v and k.accepts(v[f]) for f, k in fields.items()))


def check_object(value: Any, where: str, fix: str, what: str = "a JSON object") -> dict[str, Any]:
    """`value` if it is a dict, else a one-line error saying what it is instead."""
    if not isinstance(value, dict):
        raise fail(where, f"expected {what}, found {describe(value)}", fix)
    return value


def check_fields(record: Any, fields: Mapping[str, Kind], where: str, fix: str) -> dict[str, Any]:
    """`record` if it is a dict whose `fields` are present and of their kinds (other keys are kept)."""
    record = check_object(record, where, fix)
    for name, kind in fields.items():
        if name not in record:
            raise fail(where, f"no {json.dumps(name)} field", fix)
        if not kind.accepts(record[name]):
            raise fail(where, f"{json.dumps(name)} is {shown(record[name])}, not {kind.name}", fix)
    return record


def describe(value: Any) -> str:
    """`a list`, `the number 3`, `the string 'x'`: what a JSON value is, for messages."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)} values"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return f"the number {shown(value)}"
    return f"the string {shown(value)}"
