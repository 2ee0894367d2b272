"""Sweep specifications: a grid on the command line or in a JSON/YAML file, the runs it names
(validated configs and run names), and shards of them."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import math
import os
from typing import Any, Sequence

from cnn_jax import config as config_lib
from cnn_jax import model as model_lib
from cnn_jax.rundir import readers
from cnn_jax.config import Config, ConfigError, shown

# The most runs one sweep may hold (a mistyped grid would otherwise fill the memory).
MAX_RUNS = 100_000
# How to mend a spec file that cannot be used (the end of its one-line error).
FIX_SPEC = ("write a grid (a mapping of flag to list of values) or a list of runs (mappings of flag "
            "to value), e.g. {\"learning_rate\": [0.01, 0.1], \"seed\": [0, 1]}")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its settings (the swept values), directory name and full config."""

    name: str
    settings: dict[str, Any]
    config: Config


def field_kind(name: str) -> type:
    """The type of config field `name` (int, float, str, bool or tuple)."""
    return type(getattr(Config(), name))


def _unknown(name: str, where: str) -> ConfigError:
    """One line naming the unknown flag, the closest config fields and where they are all listed."""
    close = difflib.get_close_matches(str(name), config_lib.field_names(), n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ConfigError(f"{where}: unknown flag {shown(name)}; {hint}sweepable flags are the config fields "
                       "(experiments/train.py --helpshort lists them)")


def coerce_value(name: str, value: Any, where: str = "--sweep") -> Any:
    """`value` (text from the command line, or a JSON/YAML scalar or list) as field `name`'s type."""
    if name not in config_lib.field_names():
        raise _unknown(name, where)
    config_lib.check_renamed(name, value, where)
    kind = field_kind(name)
    bad = ConfigError(f"{where}: {name}={shown(value)} is not a valid {kind.__name__ if kind is not tuple else 'list of integers'}"
                      + {tuple: " (write one value's entries joined by ':', e.g. conv_filters=20:50,32:64)",
                         bool: " (use true or false)"}.get(kind, ""))
    if kind is tuple:
        if isinstance(value, str):
            parts = [p for p in value.replace(":", ",").split(",")]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            parts = [value]
        else:
            raise bad
        try:
            out = tuple(int(str(p).strip()) for p in parts)
        except ValueError:
            raise bad from None
        if not out or any(isinstance(p, (bool, float)) for p in parts):
            raise bad
        return out
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise bad
    if kind is int:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise bad
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except (TypeError, ValueError):
            raise bad from None
    if kind is float:
        if isinstance(value, bool):
            raise bad
        try:
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            raise bad from None
        if not math.isfinite(out):
            raise ConfigError(f"{where}: {name}={shown(value)} is not a finite number")
        return out
    if not isinstance(value, str) or not value:
        raise bad
    return value


def _check_grid(grid: dict[str, Sequence[Any]], where: str) -> dict[str, list[Any]]:
    out = {}
    for name, values in grid.items():
        if name not in config_lib.field_names():
            raise _unknown(name, where)
        if isinstance(values, (str, int, float, bool)) or values is None:
            values = [values]
        elif not isinstance(values, (list, tuple)):
            raise ConfigError(f"{where}: {name} is {shown(values)}; give a value or a list of values")
        values = [coerce_value(name, v, where) for v in values]
        if not values:
            raise ConfigError(f"{where}: {name} has no values; give at least one, e.g. {name}=a,b")
        seen = set()
        for v in values:
            if v in seen:
                raise ConfigError(f"{where}: {name} lists {format_value(v)} twice")
            seen.add(v)
        out[name] = values
    if not out:
        raise ConfigError(f"{where} is empty: give name=v1,v2 ... (e.g. learning_rate=0.01,0.1 seed=0,1)")
    return out


def parse_spec(spec: str) -> dict[str, list[Any]]:
    """`"learning_rate=0.003,0.01 pool=max,avg"` -> {"learning_rate": [0.003, 0.01], "pool": ["max", "avg"]}.

    Terms are separated by spaces; a term is `flag=v1,v2,...`. A list-valued flag writes each
    value's entries joined by ':' (`conv_filters=20:50,32:64`).
    """
    grid: dict[str, list[str]] = {}
    for term in spec.split():
        name, sep, values = term.partition("=")
        if not sep or not name:
            raise ConfigError(f"--sweep: {term!r} is not name=v1,v2,... (terms are separated by spaces)")
        if name in grid:
            raise ConfigError(f"--sweep: {name} is given twice; list all its values in one term")
        if name not in config_lib.field_names():
            raise _unknown(name, "--sweep")
        parts = values.split(",") if values else []
        if any(not p for p in parts) or not parts:
            raise ConfigError(f"--sweep: {term!r} has an empty value; give {name}=v1,v2,...")
        grid[name] = parts
    return _check_grid(grid, "--sweep")


def grid_settings(grid: dict[str, list[Any]], where: str = "--sweep") -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last flag varying fastest (at most `MAX_RUNS`)."""
    count = math.prod(len(values) for values in grid.values())
    if count > MAX_RUNS:
        raise ConfigError(f"{where}: the grid has {count} runs, more than {MAX_RUNS}; "
                          "sweep fewer values, or split the sweep into several")
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def load_spec_file(path: str) -> list[dict[str, Any]]:
    """Settings from a JSON or YAML file: a grid (a dict of lists) or a list of run dicts."""
    where = f"--sweep_file={path}"
    if path.endswith((".yaml", ".yml")):
        value = readers.read_yaml(path, where, FIX_SPEC)
    else:
        value = readers.read_json(path, where, FIX_SPEC)
    if isinstance(value, dict):
        return grid_settings(_check_grid(value, where), where)
    if isinstance(value, list) and 0 < len(value) <= MAX_RUNS:
        runs = []
        for i, entry in enumerate(value):
            if not isinstance(entry, dict) or not entry:
                raise ConfigError(f"{where}: run {i} must be a non-empty mapping of flag to value, "
                                  f"got {shown(entry)}")
            runs.append({name: coerce_value(name, v, f"{where}: run {i}") for name, v in entry.items()})
        return runs
    raise readers.fail(where, f"expected a grid or a non-empty list of at most {MAX_RUNS} runs, found "
                              f"{readers.describe(value)}", FIX_SPEC)


def format_value(value: Any) -> str:
    """A value as written in run names and tables: 0.01, max, 20:50, true."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ":".join(map(str, value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def run_name(settings: dict[str, Any]) -> str:
    """The run directory's name: `name=value` pairs sorted by name, joined by ','."""
    name = ",".join(f"{k}={format_value(settings[k])}" for k in sorted(settings))
    name = name.replace(os.sep, "_")
    if len(name) > 200:   # file names are limited to 255 bytes
        name = name[:180] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def make_runs(base: Config, settings_list: Sequence[dict[str, Any]], where: str = "--sweep") -> list[Run]:
    """One validated Run per settings dict; a value that fails `model.validate` names its run."""
    runs, names = [], {}
    for settings in settings_list:
        name = run_name(settings)
        if name in names:
            raise ConfigError(f"{where}: run {name} appears twice")
        names[name] = True
        try:
            config = model_lib.validate(config_lib.replace(base, **settings))
        except ConfigError as e:
            raise ConfigError(f"{where}: run {name}: {e}") from None
        runs.append(Run(name, dict(settings), config))
    return runs


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard={text!r} is not allowed: write i/n, e.g. 0/4 (shard i of n, "
                          "counting from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard={text!r} is not allowed: need n >= 1 and 0 <= i < n")
    return i, n


def shard(runs: Sequence[Run], index: int, count: int) -> list[Run]:
    """Every `count`-th run starting at `index`: the runs of one machine in a job array."""
    return list(runs[index::count])
