"""The search space: which config fields a search varies and over what.

On the command line (`--space`), terms separated by spaces:

    learning_rate=loguniform(1e-4,1e-1)   a float, uniform in log space between the bounds
    momentum=uniform(0.5,0.99)            a float, uniform between the bounds
    num_fc=int(64,256)                    an integer from low to high, both included
    batch_size=logint(16,256)             an integer, uniform in log space
    optimizer=adam,momentum               a categorical choice (one value: fixed)

In a JSON or YAML file (`--space_file`), a mapping of field to such a string, or to a
list of choices, or to {"type": "loguniform", "low": ..., "high": ...}.

Every field is a `Config` field; each bound and choice is checked with `model.validate`
against the base config, so a space that would give an invalid run is refused before
anything trains.
"""

from __future__ import annotations

import json
import re
from typing import Any

import optuna

from cnn_jax import config as config_lib
from cnn_jax import model as model_lib
from cnn_jax import sweep
from cnn_jax.rundir import readers
from cnn_jax.config import Config, ConfigError

RANGE_KINDS = ("uniform", "loguniform", "int", "logint")
_RANGE = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$")

Space = dict[str, optuna.distributions.BaseDistribution]


def _unknown(name: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown field {name!r}; searchable fields are the config fields: "
                       f"{', '.join(config_lib.field_names())}")


def _choice_value(name: str, value: Any, where: str) -> Any:
    """A categorical choice as Optuna stores it: a scalar (list-valued fields as 'a:b' text)."""
    value = sweep.coerce_value(name, value, where)
    return sweep.format_value(value) if isinstance(value, tuple) else value


def _range(name: str, kind: str, low: Any, high: Any, where: str) -> optuna.distributions.BaseDistribution:
    field_kind = sweep.field_kind(name)
    term = f"{name}={kind}({low},{high})"
    if kind in ("uniform", "loguniform") and field_kind is not float:
        raise ConfigError(f"{where}: {term}: {name} is not a float field; use int(...) for integers "
                          "or list the choices (a,b,c)")
    if kind in ("int", "logint") and field_kind is not int:
        raise ConfigError(f"{where}: {term}: {name} is not an integer field"
                          + ("; use uniform(...) or loguniform(...)" if field_kind is float else
                             "; list the choices instead (a,b,c)"))
    try:
        if kind in ("int", "logint"):
            lo, hi = (int(str(v).strip()) for v in (low, high))
        else:
            lo, hi = (float(str(v).strip()) for v in (low, high))
    except ValueError:
        raise ConfigError(f"{where}: {term}: the bounds must be {'integers' if kind in ('int', 'logint') else 'numbers'}") from None
    if not lo < hi:
        raise ConfigError(f"{where}: {term} is an empty range: the low bound must be below the high one")
    if kind.startswith("log") and lo <= 0:
        raise ConfigError(f"{where}: {term}: a log range must lie above zero (low > 0); "
                          f"use {'uniform' if kind == 'loguniform' else 'int'}(...) to include {lo}")
    if kind in ("int", "logint"):
        return optuna.distributions.IntDistribution(lo, hi, log=kind == "logint")
    return optuna.distributions.FloatDistribution(lo, hi, log=kind == "loguniform")


def parse_term(name: str, text: str, where: str) -> optuna.distributions.BaseDistribution:
    """One field's distribution from its text: `kind(low,high)` or `a,b,c`."""
    if name not in config_lib.field_names():
        raise _unknown(name, where)
    match = _RANGE.match(text)
    if match:
        kind, inside = match.groups()
        if kind not in RANGE_KINDS:
            raise ConfigError(f"{where}: {name}={text}: unknown distribution {kind!r}; use one of "
                              f"{', '.join(RANGE_KINDS)}, or list the choices (a,b,c)")
        bounds = inside.split(",")
        if len(bounds) != 2 or not all(b.strip() for b in bounds):
            raise ConfigError(f"{where}: {name}={text}: give two bounds, {kind}(low,high)")
        return _range(name, kind, *bounds, where)
    if "(" in text or ")" in text:
        raise ConfigError(f"{where}: {name}={text} is not a distribution: write kind(low,high) with kind one "
                          f"of {', '.join(RANGE_KINDS)}, or list the choices (a,b,c)")
    return _categorical(name, text.split(","), where)


def _categorical(name: str, values: list[Any], where: str) -> optuna.distributions.CategoricalDistribution:
    if not values or any(isinstance(v, str) and not v.strip() for v in values):
        raise ConfigError(f"{where}: {name} has an empty choice; give {name}=a,b,...")
    choices = [_choice_value(name, v.strip() if isinstance(v, str) else v, where) for v in values]
    if len(set(choices)) != len(choices):
        raise ConfigError(f"{where}: {name} lists a choice twice")
    return optuna.distributions.CategoricalDistribution(choices)


def parse(text: str) -> Space:
    """`--space` text -> {field: distribution}."""
    where = "--space"
    space: Space = {}
    for term in text.split():
        name, sep, value = term.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{where}: {term!r} is not name=distribution (terms are separated by spaces, "
                              "e.g. learning_rate=loguniform(1e-4,1e-1) optimizer=adam,momentum)")
        if name in space:
            raise ConfigError(f"{where}: {name} is given twice")
        space[name] = parse_term(name, value, where)
    if not space:
        raise ConfigError(f"{where} is empty: give name=distribution terms, e.g. learning_rate=loguniform(1e-4,1e-1)")
    return space


def load_file(path: str) -> Space:
    """A space from a JSON or YAML file (see the module docstring)."""
    where = f"--space_file={path}"
    fix = "write a mapping of field to distribution, e.g. {\"learning_rate\": \"loguniform(1e-4,1e-1)\"}"
    read = readers.read_yaml if path.endswith((".yaml", ".yml")) else readers.read_json
    value = read(path, where, fix)
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{where}: expected a non-empty mapping of field to distribution")
    space: Space = {}
    for name, spec in value.items():
        if name not in config_lib.field_names():
            raise _unknown(name, where)
        if isinstance(spec, str):
            space[name] = parse_term(name, spec, where)
        elif isinstance(spec, list):
            space[name] = _categorical(name, spec, where)
        elif isinstance(spec, dict):
            kind = spec.get("type")
            if kind not in RANGE_KINDS or set(spec) != {"type", "low", "high"}:
                raise ConfigError(f"{where}: {name}: a range is {{type, low, high}} with type one of "
                                  f"{', '.join(RANGE_KINDS)}; got {json.dumps(spec)}")
            space[name] = _range(name, kind, spec["low"], spec["high"], where)
        else:
            space[name] = _categorical(name, [spec], where)
    return space


def to_config_values(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna's sampled params -> config field values (list-valued fields back to tuples)."""
    return {name: sweep.coerce_value(name, value, "trial") for name, value in params.items()}


def endpoints(distribution: optuna.distributions.BaseDistribution) -> list[Any]:
    """The values that bound what `distribution` can give: its bounds, or every choice."""
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def check_against(space: Space, base: Config, where: str) -> None:
    """Refuse a space whose bounds or choices make an invalid config from `base`, or that varies a
    field fixed by how the search runs (seed is allowed: it selects init and data order)."""
    for name, distribution in space.items():
        for value in endpoints(distribution):
            try:
                model_lib.validate(config_lib.replace(base, **to_config_values({name: value})))
            except ConfigError as e:
                raise ConfigError(f"{where}: {name}={sweep.format_value(value)} gives an invalid run: {e}") from None


def to_json(space: Space) -> str:
    """A canonical text of the space, stored with the study to refuse a changed space."""
    return json.dumps({name: json.loads(optuna.distributions.distribution_to_json(d))
                       for name, d in sorted(space.items())}, sort_keys=True)


def describe(space: Space) -> str:
    """The space as `--space` text."""
    terms = []
    for name, d in space.items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            terms.append(f"{name}={','.join(sweep.format_value(c) for c in d.choices)}")
        elif isinstance(d, optuna.distributions.IntDistribution):
            terms.append(f"{name}={'logint' if d.log else 'int'}({d.low},{d.high})")
        else:
            terms.append(f"{name}={'loguniform' if d.log else 'uniform'}({d.low!r},{d.high!r})")
    return " ".join(terms)


def grid(space: Space) -> dict[str, list[Any]]:
    """The space as a grid for Optuna's GridSampler: choices, and every integer of an int range;
    a float range has no grid (ConfigError)."""
    out = {}
    for name, d in space.items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            out[name] = list(d.choices)
        elif isinstance(d, optuna.distributions.IntDistribution):
            out[name] = list(range(d.low, d.high + 1, d.step))
        else:
            raise ConfigError(f"--sampler=grid: {name} is a float range; list its values instead "
                              f"(e.g. {name}={d.low!r},{d.high!r})")
    return out


def describe_params(params: dict[str, Any]) -> str:
    """A trial's params as `name=value` text, floats to 4 significant digits."""
    return ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
