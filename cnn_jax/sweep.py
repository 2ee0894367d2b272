"""Hyperparameter sweeps: a grid or a list of runs, trained together with `jax.vmap` where shapes allow.

A sweep is a list of *settings* (config overrides), one per run, from a grid

    "learning_rate=0.003,0.01,0.03 pool=max,avg seed=0,1,2"        (every combination: 18 runs)

or from a JSON/YAML file holding such a grid (a dict of lists) or a list of run dicts.
Every run gets a run directory named after its settings
(`learning_rate=0.01,pool=max,seed=0`) in the format of `experiments/train.py --workdir`
(config.json, metrics.jsonl, results.json, a final checkpoint), plus `sweep_result.json`,
written last, which marks the run finished.

Runs whose configs differ only in `PER_RUN_FIELDS` (learning rate, weight scale, momentum,
weight decay, seed, ...) compute with arrays of the same shapes, so they form one *group*
trained as one jit-compiled program: the train step of `cnn_jax.train` is `jax.vmap`-ed
over a leading run axis of the params, the optimiser state and per-run hyperparameters,
which are traced arrays inside the step. Each run keeps its own init key and data order
(`data.epoch_permutation(seed, epoch, n)`), so it computes what it computes alone.
Fields that change shapes or the program (filters, kernels, batch size, pool, optimizer,
...) split runs into separate groups.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import config as config_lib
from cnn_jax import data as data_lib
from cnn_jax import lock, lowering, model, optim, progress, readers, report, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import Config, ConfigError, shown

# Float fields that are traced per-run values inside the vmapped step.
VECTORISED_FIELDS = ("learning_rate", "weight_scale", "momentum", "weight_decay")
# Fields that may differ between the runs of one group: the traced floats, the seed
# (init key and data order) and host-side reporting knobs.
PER_RUN_FIELDS = VECTORISED_FIELDS + ("seed", "loss_smoothing", "log_every")
# Fields that select the data: runs sharing them share one loaded dataset.
DATA_FIELDS = ("dataset", "data_dir", "train_subset", "test_subset", "input_shape", "num_classes")
SWEEP_RESULT_FILE = "sweep_result.json"
RESULTS_CSV, RESULTS_MD, RESULTS_PLOT = "results.csv", "results.md", "results.png"
# The most runs one sweep may hold (a mistyped grid would otherwise fill the memory).
MAX_RUNS = 100_000
# How to mend a spec file that cannot be used (the end of its one-line error).
FIX_SPEC = ("write a grid (a mapping of flag to list of values) or a list of runs (mappings of flag "
            "to value), e.g. {\"learning_rate\": [0.01, 0.1], \"seed\": [0, 1]}")
# Bytes of memory that `auto_max_parallel` lets one group use, as a fraction of what is free.
MEMORY_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its settings (the swept values), directory name and full config."""

    name: str
    settings: dict[str, Any]
    config: Config


# ----------------------------------------------------------------------------- specification


def _field_kind(name: str) -> type:
    return type(getattr(Config(), name))


def _unknown(name: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown flag {shown(name)}; sweepable flags are the config fields: "
                       f"{', '.join(config_lib.field_names())}")


def coerce_value(name: str, value: Any, where: str = "--sweep") -> Any:
    """`value` (text from the command line, or a JSON/YAML scalar or list) as field `name`'s type."""
    if name not in config_lib.field_names():
        raise _unknown(name, where)
    kind = _field_kind(name)
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
    """One validated Run per settings dict; a value that fails `config.validate` names its run."""
    runs, names = [], {}
    for settings in settings_list:
        name = run_name(settings)
        if name in names:
            raise ConfigError(f"{where}: run {name} appears twice")
        names[name] = True
        try:
            config = config_lib.validate(config_lib.replace(base, **settings))
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


# ----------------------------------------------------------------------------- grouping


def group_key(config: Config) -> Config:
    """The config with every per-run field at its default: runs with equal keys share one program."""
    defaults = Config()
    return dataclasses.replace(config, **{f: getattr(defaults, f) for f in PER_RUN_FIELDS})


def data_key(config: Config) -> tuple[Any, ...]:
    """What selects the data: runs with equal keys share one loaded dataset."""
    return tuple(getattr(config, f) for f in DATA_FIELDS)


def run_memory_bytes(config: Config) -> int:
    """A rough upper bound on the memory one run of a group needs (float32 params, optimiser
    state, and the activations and im2col patches of a training batch or an eval batch)."""
    per_example = 0
    shapes = dict(model.layer_shapes(config))
    channels = config.input_shape[2]
    for i, kernel in enumerate(config.conv_kernels, start=1):
        h, w, filters = shapes[f"conv{i}"]
        per_example += h * w * (filters + kernel * kernel * channels) + math.prod(shapes[f"pool{i}"])
        channels = filters
    per_example += config.num_fc + config.num_classes + math.prod(config.input_shape)
    num_params = sum(math.prod(s) for layer in model.param_shapes(config).values() for s in layer.values())
    activations = per_example * max(3 * config.batch_size, config.eval_batch_size)
    return 4 * (activations + 5 * num_params)


def memory_budget() -> int:
    """Bytes a group may use: a fraction of the accelerator's memory, or of free host memory on CPU."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = 4 << 30
    return int(free * MEMORY_FRACTION)


def auto_max_parallel(config: Config, budget_bytes: int) -> int:
    """How many runs of `config`'s group fit in `budget_bytes` (at least 1)."""
    return max(1, budget_bytes // run_memory_bytes(config))


def default_max_parallel(config: Config) -> int:
    """`--max_parallel=0`: as many runs of `config`'s group as fit in `memory_budget()`.

    On the 2-core CPU of WORKSPACE.md ("Sweeps") the training throughput per image of a
    scanned group of 1, 3 or 6 runs was the same within the machine's noise, so the memory
    bound is the only bound there too; on accelerators vmapping is where the speed comes from.
    """
    return auto_max_parallel(config, memory_budget())


def group_runs(runs: Sequence[Run], max_parallel: int | Callable[[Config], int]) -> list[list[Run]]:
    """Runs split into groups of equal `group_key`, in order of first appearance; a group larger
    than `max_parallel` (an int, or a function of the config) is split into near-equal chunks."""
    by_key: dict[Config, list[Run]] = {}
    for run in runs:
        by_key.setdefault(group_key(run.config), []).append(run)
    groups = []
    for members in by_key.values():
        limit = max_parallel(members[0].config) if callable(max_parallel) else max_parallel
        chunks = math.ceil(len(members) / max(1, limit))
        size = math.ceil(len(members) / chunks)
        groups += [members[i:i + size] for i in range(0, len(members), size)]
    return groups


# ----------------------------------------------------------------------------- vectorised training


def _configured(config: Config, hparams: dict[str, jax.Array]) -> Config:
    """`config` with traced per-run values (only the model init and optimiser read them)."""
    return dataclasses.replace(config, **hparams)


def make_group_fns(config: Config, total_steps: int):
    """(init, step) of a group whose runs differ in `VECTORISED_FIELDS` and seed.

    init(seeds, hparams) -> (params, opt_state), both with a leading run axis.
    step(params, (hparams, opt_state), images, labels) is `train.make_train_step`'s step,
    vmapped over runs; images and labels hold one batch per run. Its signature is the
    one `train.make_step_runner` / `make_scan_runner` expect (the hparams ride along in
    the optimiser-state argument).
    """

    def init_one(seed, hparams):
        run_config = _configured(config, hparams)
        params = model.init(jax.random.key(seed), run_config)
        return params, optim.make_optimizer(run_config, total_steps).init(params)

    def step_one(hparams, params, opt_state, images, labels):
        run_config = _configured(config, hparams)
        train_step = train.make_train_step(run_config, optim.make_optimizer(run_config, total_steps))
        return train_step(params, opt_state, images, labels)

    def step(params, state, images, labels):
        hparams, opt_state = state
        params, opt_state, metrics = jax.vmap(step_one)(hparams, params, opt_state, images, labels)
        return params, (hparams, opt_state), metrics

    return jax.jit(jax.vmap(init_one)), step


@functools.lru_cache(maxsize=16)
def compiled_group(key: Config, total_steps: int, loop: str):
    """(jitted init, jitted runner) of a group; cached, so groups of one key compile once per size."""
    init, step = make_group_fns(key, total_steps)
    return init, (train.make_step_runner if loop == "step" else train.make_scan_runner)(key, step)


@functools.lru_cache(maxsize=16)
def _eval_runs_fn(config: Config):
    config = lowering.inference_config(config)   # what train.evaluate runs
    return jax.jit(jax.vmap(lambda p, x, y, m: train._eval_batch(p, x, y, m, config),
                            in_axes=(0, None, None, None)))


def evaluate_runs(params: model.Params, images: jax.Array, labels: jax.Array, config: Config,
                  return_predictions: bool = False, vectorised: bool | None = None) -> dict[str, np.ndarray]:
    """`train.evaluate` for stacked params: loss and accuracy per run (arrays over the run axis).

    `vectorised` (default: on accelerators) evaluates all runs in one vmapped call per batch;
    otherwise run by run with `train.evaluate`, which XLA:CPU runs faster (a vmapped batch is
    R times larger, and on CPU the time per image grows with the size of the arrays).
    """
    if vectorised is None:
        vectorised = jax.default_backend() != "cpu"
    if not vectorised:
        results = [train.evaluate(unstack(params, r), images, labels, config, return_predictions)
                   for r in range(len(jax.tree.leaves(params)[0]))]
        return {key: np.stack([np.asarray(result[key]) for result in results]) for key in results[0]}
    fn = _eval_runs_fn(config)
    n = len(labels)
    loss_sum, correct_sum, predictions = 0.0, 0, []
    for x, y, mask, real in train.eval_batches(images, labels, config.eval_batch_size):
        batch_loss, batch_correct, logits = fn(params, x, y, mask)
        loss_sum += batch_loss
        correct_sum += batch_correct
        if return_predictions:
            predictions.append(jnp.argmax(logits[:, :real], axis=-1))
    result = {"loss": np.asarray(loss_sum, np.float64) / n,
              "accuracy": np.asarray(correct_sum, np.float64) / n}
    if return_predictions:
        result["predictions"] = np.asarray(jnp.concatenate(predictions, axis=1))
    return result


def resolve_loop(config: Config) -> str:
    """The execution strategy of a group: `--loop` when given, else `scan` on every backend.

    A vmapped group runs steps inside `lax.scan` (in chunks of `log_every` steps, for
    progress and logs): on the 2-core CPU of WORKSPACE.md ("Sweeps") a scanned group of 6
    runs trained 2.5x the images per second of the same group called once per step."""
    return train.resolve_loop(config)


@dataclasses.dataclass
class GroupResult:
    """What `train_group` returns: stacked final state, per-run histories and outcome."""

    params: model.Params                    # leading axis: run
    opt_state: Any                          # leading axis: run
    histories: list[list[dict[str, Any]]]   # one record per finished epoch, as `train.fit`'s
    diverged: list[str | None]              # why a run stopped (non-finite loss), or None
    test: dict[str, np.ndarray]             # last test evaluation, with predictions
    steps_per_epoch: int
    seconds: float                          # wall-clock time of the whole group


def _noop(*args: Any) -> None:
    del args


def train_group(configs: Sequence[Config], dataset: data_lib.Dataset,
                on_log: Callable[[int, dict[str, Any]], None] = _noop,
                on_epoch: Callable[[int, dict[str, Any]], None] = _noop) -> GroupResult:
    """Train runs that share a `group_key` together; each computes what `train.fit` computes alone.

    on_log(run_index, record) gets `{"kind": "train", ...}` records every `log_every` steps,
    on_epoch(run_index, record) the per-epoch record. A run whose loss or params become
    non-finite is marked diverged (its history stops) while the others go on.
    """
    keys = {group_key(c) for c in configs}
    if len(keys) != 1:
        raise ValueError("train_group needs configs that differ only in PER_RUN_FIELDS")
    start_time = time.perf_counter()
    config, num_runs = configs[0], len(configs)
    n = len(dataset.train_labels)
    num_steps = train.steps_per_epoch(config, n)
    if num_steps == 0:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than the {n} training images")
    loop = resolve_loop(config)
    init, runner = compiled_group(group_key(config), num_steps * config.epochs, loop)
    hparams = {f: jnp.asarray([getattr(c, f) for c in configs], jnp.float32) for f in VECTORISED_FIELDS}
    params, opt_state = init(jnp.asarray([c.seed for c in configs], jnp.int32), hparams)
    state = (hparams, opt_state)
    train_images, train_labels = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
    test_images, test_labels = jnp.asarray(dataset.test_images), jnp.asarray(dataset.test_labels)

    histories: list[list[dict[str, Any]]] = [[] for _ in configs]
    diverged: list[str | None] = [None] * num_runs
    moving: list[float | None] = [None] * num_runs
    log_every = min(c.log_every for c in configs)
    test: dict[str, np.ndarray] = {}
    step_done = 0
    for epoch in range(config.epochs):
        order = jnp.asarray(np.stack([data_lib.epoch_permutation(c.seed, epoch, n) for c in configs]))
        bar = progress.epoch_progress(epoch, num_steps)
        epoch_start = time.perf_counter()
        last_log = (epoch_start, step_done)
        epoch_losses: list[list[float]] = [[] for _ in configs]
        epoch_correct = [0] * num_runs

        def absorb(step_metrics: Any) -> None:
            """Bring the losses of the steps since the last call to the host: check, accumulate, log."""
            nonlocal step_done, last_log
            host = jax.device_get(step_metrics)  # stacked on the host: no per-length compiles
            if isinstance(host, list):
                host = {key: np.stack([m[key] for m in host]) for key in host[0]}
            losses, correct = np.asarray(host["loss"]), np.asarray(host["correct"])   # (steps, runs)
            finite = np.asarray(host["finite"]) & np.isfinite(losses)
            now = time.perf_counter()
            ips = len(losses) * config.batch_size / max(now - last_log[0], 1e-9)
            for r, run_config in enumerate(configs):
                if diverged[r]:
                    continue
                for s in range(len(losses)):
                    step = step_done + s + 1
                    if not finite[s, r]:
                        what = (f"loss became {losses[s, r]}" if not np.isfinite(losses[s, r])
                                else "parameters or optimiser state became non-finite")
                        diverged[r] = f"{what} at step {step} (epoch {epoch}); lower --learning_rate"
                        break
                    moving[r] = train.moving_average([losses[s, r]], run_config.loss_smoothing, moving[r])
                    epoch_losses[r].append(float(losses[s, r]))
                    epoch_correct[r] += int(correct[s, r])
                    if step % run_config.log_every == 0:
                        window = epoch_losses[r][-run_config.log_every:]
                        on_log(r, {"kind": "train", "step": step, "epoch": epoch,
                                   "loss": float(np.mean(window)), "moving_loss": moving[r],
                                   "images_per_second": ips})
            step_done += len(losses)
            live = [r for r in range(num_runs) if not diverged[r]]
            if live:
                bar.log(step_done, float(np.mean(losses[-1, live])), ips * len(live))
            last_log = (now, step_done)

        if loop == "step":
            pending = []
            for step in range(num_steps):
                params, state, metrics = runner(params, state, train_images, train_labels,
                                                order, np.int32(step))
                pending.append(metrics)
                bar.advance()
                if (step_done + len(pending)) % log_every == 0 or step == num_steps - 1:
                    absorb(pending)
                    pending = []
        else:   # chunks of log_every steps: at most two chunk lengths, so two compiles
            for first in range(0, num_steps, log_every):
                chunk = min(log_every, num_steps - first)
                params, state, metrics = runner(params, state, train_images, train_labels,
                                                order, np.int32(first), chunk)
                bar.advance(chunk)
                absorb(metrics)
        bar.close()
        epoch_time = time.perf_counter() - epoch_start
        if all(diverged):
            break
        last = epoch == config.epochs - 1
        if config.train_eval == "full":
            train_eval = evaluate_runs(params, train_images, train_labels, config)
        else:
            train_eval = {"loss": [np.mean(np.asarray(l, np.float32)) if l else np.nan for l in epoch_losses],
                          "accuracy": [c / (num_steps * config.batch_size) for c in epoch_correct]}
        test = evaluate_runs(params, test_images, test_labels, config, return_predictions=last)
        for r in range(num_runs):
            if diverged[r]:
                continue
            record = {
                "epoch": epoch, "step": step_done, "moving_loss": moving[r],
                "train_loss": float(train_eval["loss"][r]), "train_accuracy": float(train_eval["accuracy"][r]),
                "test_loss": float(test["loss"][r]), "test_accuracy": float(test["accuracy"][r]),
                "epoch_time": epoch_time, "images_per_second": num_steps * config.batch_size / epoch_time,
            }
            histories[r].append(record)
            on_epoch(r, record)
    return GroupResult(params, state[1], histories, diverged, test, num_steps,
                       time.perf_counter() - start_time)


def unstack(tree: Any, index: int) -> Any:
    """Run `index`'s slice of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], tree)


# ----------------------------------------------------------------------------- run directories


def run_dir(sweep_dir: str, run: Run) -> str:
    return os.path.join(sweep_dir, run.name)


def is_finished(path: str) -> bool:
    return os.path.exists(os.path.join(path, SWEEP_RESULT_FILE))


# Fields that do not change what a run computes: a finished run counts as done whatever they are.
IGNORED_WHEN_RESUMING = workdir_lib.RESUMABLE_FIELDS - {"epochs", "train_eval"}


def pending_runs(sweep_dir: str, runs: Sequence[Run]) -> tuple[list[Run], list[Run]]:
    """(runs still to train, runs already finished); refuses (ConfigError, before anything is
    written) a run directory that holds a run with another config or a damaged sweep_result.json."""
    if os.path.isfile(sweep_dir):
        raise ConfigError(f"--workdir={sweep_dir} is a file, not a sweep directory")
    if workdir_lib.holds_run(sweep_dir):
        raise ConfigError(f"--workdir={sweep_dir} holds a training run ({workdir_lib.CONFIG_FILE}), not a "
                          "sweep; choose another --workdir")
    todo, done = [], []
    for run in runs:
        path = run_dir(sweep_dir, run)
        if os.path.exists(os.path.join(path, workdir_lib.CONFIG_FILE)):
            differences = workdir_lib.config_differences(workdir_lib.read_config(path), run.config,
                                                         ignore=IGNORED_WHEN_RESUMING)
            if differences:
                raise ConfigError(f"{path} holds a run with another config ({differences[0]}); "
                                  "use another --workdir for a changed sweep")
        if is_finished(path):
            read_row(os.path.join(path, SWEEP_RESULT_FILE))   # a damaged result fails before anything trains
        (done if is_finished(path) else todo).append(run)
    return todo, done


def result_row(run: Run, history: list[dict[str, Any]], status: str, message: str,
               seconds: float, group_size: int) -> dict[str, Any]:
    """The run's line of the results table (what sweep_result.json holds)."""
    last = history[-1] if history else {}
    return {
        "name": run.name, "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in run.settings.items()},
        "status": status, "message": message, "epochs": len(history),
        **{k: last.get(k) for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
                                    "moving_loss")},
        "time_s": seconds, "group_size": group_size,
    }


def run_group(sweep_dir: str, runs: Sequence[Run], dataset: data_lib.Dataset,
              print_fn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train one group and keep each run in its directory; return the runs' result rows.

    Each run directory is locked for the group's whole training (`cnn_jax.lock`: another
    process training the same run is refused; the sweep directory itself is shared by every
    worker and never locked), then (re)started (a previous unfinished attempt is replaced);
    metrics are written as training goes; at the end come results.json, a checkpoint of
    the final state and, last, sweep_result.json (the run counts as finished from then on).
    A write that fails raises `workdir.WriteError` saying that the finished runs are kept.
    """
    paths = [run_dir(sweep_dir, r) for r in runs]
    with contextlib.ExitStack() as locks:
        for path in paths:
            locks.enter_context(lock.hold(path))
        for path in paths:
            if is_finished(path):
                raise ConfigError(f"{path} was finished by another process meanwhile; run the command "
                                  "again to train the runs still missing")
        try:
            return _run_group_locked(runs, paths, dataset, print_fn)
        except (BrokenPipeError, InterruptedError):
            raise
        except OSError as e:
            failed = workdir_lib.write_error(e.filename or sweep_dir, e)
            raise workdir_lib.WriteError(f"{failed}; the runs finished before are kept: make room (or make "
                                         f"{sweep_dir} writable) and run the command again to train the "
                                         "rest") from None


def _run_group_locked(runs: Sequence[Run], paths: list[str], dataset: data_lib.Dataset,
                      print_fn: Callable[[str], None]) -> list[dict[str, Any]]:
    from cnn_jax import checkpoint, run as run_lib   # orbax is only needed here

    for path, r in zip(paths, runs):
        workdir_lib.start(path, r.config, overwrite=True)
    logs = [workdir_lib.MetricsLog(path) for path in paths]

    def on_log(i: int, record: dict[str, Any]) -> None:
        logs[i].append(record)

    def on_epoch(i: int, record: dict[str, Any]) -> None:
        logs[i].append({"kind": "epoch", **record})
        logs[i].flush()
        print_fn(f"{runs[i].name}: {train.format_epoch(record)}")

    result = train_group([r.config for r in runs], dataset, on_log, on_epoch)
    rows = []
    for i, (path, r) in enumerate(zip(paths, runs)):
        logs[i].flush()
        history = result.histories[i]
        if result.diverged[i]:
            status, message = "diverged", result.diverged[i]
            print_fn(f"{r.name}: diverged: {message}")
        else:
            status, message = "ok", ""
            test = {"loss": float(result.test["loss"][i]), "accuracy": float(result.test["accuracy"][i])}
            confusion = report.confusion_matrix(dataset.test_labels, result.test["predictions"][i],
                                                dataset.num_classes)
            test.update(confusion=confusion, per_class_accuracy=report.per_class_accuracy(confusion))
            workdir_lib.write_json(os.path.join(path, workdir_lib.RESULTS_FILE),
                                   report.results_json(test, dataset.class_names, history[-1]["step"]))
            params, opt_state = jax.device_get((unstack(result.params, i), unstack(result.opt_state, i)))
            state = train.TrainState(params, opt_state, step=history[-1]["step"],
                                     moving_loss=history[-1]["moving_loss"], history=history)
            manager = checkpoint.open_manager(path)
            try:
                checkpoint.save(manager, state.step, params, opt_state,
                                run_lib.checkpoint_meta(state, r.config, result.steps_per_epoch))
            finally:
                manager.close()
        row = result_row(r, history, status, message, result.seconds, len(runs))
        workdir_lib.write_json(os.path.join(path, SWEEP_RESULT_FILE), row)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- results


# The fields of sweep_result.json that the tables and the plot read (`result_row` writes them).
ROW_FIELDS = {"name": readers.TEXT, "settings": readers.OBJECT, "status": readers.one_of("ok", "diverged"),
              "message": readers.TEXT, "epochs": readers.COUNT, "time_s": readers.NUMBER,
              "group_size": readers.POSITIVE,
              **{k: readers.NUMBER_OR_NULL for k in ("train_loss", "train_accuracy", "test_loss",
                                                     "test_accuracy", "moving_loss")}}
# A finished run ("ok") has its final metrics.
OK_ROW_FIELDS = {k: readers.NUMBER for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")}


def read_row(path: str) -> dict[str, Any]:
    """A run's sweep_result.json, checked: the fields of `ROW_FIELDS`, settings that are config
    values (normalised to their types, lists for list-valued flags)."""
    fix = (f"delete it: the run then counts as unfinished and running the sweep again trains it "
           f"(or delete its folder {os.path.dirname(path)})")
    row = readers.check_fields(workdir_lib.read_json(path, fix), ROW_FIELDS, path, fix)
    if row["status"] == "ok":
        readers.check_fields(row, OK_ROW_FIELDS, path, fix)
    settings = {}
    for name, value in row["settings"].items():
        try:
            value = coerce_value(name, value, "settings")
        except ConfigError as e:
            raise readers.fail(path, str(e), fix) from None
        settings[name] = list(value) if isinstance(value, tuple) else value
    return {**row, "settings": settings}


def collect_rows(sweep_dir: str) -> list[dict[str, Any]]:
    """The result rows of every finished run directory in `sweep_dir` (all shards), by name."""
    rows = []
    if not os.path.isdir(sweep_dir):
        return rows
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name, SWEEP_RESULT_FILE)
        if os.path.isfile(path):
            rows.append(read_row(path))
    return rows


def swept_fields(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every field set by some run, sorted."""
    return sorted({k for row in rows for k in row["settings"]})


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped over seeds: mean and sample std of the final metrics of the runs that finished,
    sorted by mean test accuracy (best first)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    settings_of: dict[str, dict[str, Any]] = {}
    for row in rows:
        settings = {k: v for k, v in row["settings"].items() if k != "seed"}
        key = json.dumps(settings, sort_keys=True)
        groups.setdefault(key, []).append(row)
        settings_of[key] = settings
    out = []
    for key, members in groups.items():
        ok = [m for m in members if m["status"] == "ok"]
        entry = {"settings": settings_of[key], "runs": len(members), "ok": len(ok),
                 "seeds": [m["settings"].get("seed") for m in members]}
        for metric in ("test_accuracy", "train_accuracy", "test_loss", "train_loss"):
            values = np.array([m[metric] for m in ok], np.float64)
            entry[f"{metric}_mean"] = float(values.mean()) if len(values) else None
            entry[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        out.append(entry)
    out.sort(key=lambda e: -1.0 if e["test_accuracy_mean"] is None else e["test_accuracy_mean"],
             reverse=True)
    return out


def _settings_text(settings: dict[str, Any], fields: Sequence[str]) -> list[str]:
    return [format_value(tuple(settings[f]) if isinstance(settings.get(f), list) else settings[f])
            if f in settings else "" for f in fields]


def _num(value: Any, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    """One line per run: its settings, status, final metrics, time."""
    fields = swept_fields(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    metrics = ["train_loss", "train_accuracy", "test_loss", "test_accuracy", "moving_loss"]
    writer.writerow(["name", *fields, "status", "epochs", *metrics, "time_s", "group_size", "message"])
    for row in rows:
        writer.writerow([row["name"], *_settings_text(row["settings"], fields), row["status"], row["epochs"],
                         *["" if row[m] is None else repr(row[m]) for m in metrics],
                         f"{row['time_s']:.2f}", row["group_size"], row["message"]])
    return out.getvalue()


def results_markdown(rows: Sequence[dict[str, Any]], plot_name: str | None = RESULTS_PLOT) -> str:
    """The summary over seeds (best first) and every run, as Markdown tables."""
    fields = swept_fields(rows)
    group_fields = [f for f in fields if f != "seed"]
    lines = [f"# Sweep results ({len(rows)} runs)", ""]
    lines += ["## Summary over seeds (sorted by mean test accuracy)", "",
              "| " + " | ".join([*group_fields, "runs", "test acc mean", "test acc std",
                                 "train acc mean", "test loss mean"]) + " |",
              "|" + "---|" * (len(group_fields) + 5)]
    for e in summarize(rows):
        runs = f"{e['ok']}/{e['runs']}" if e["ok"] != e["runs"] else str(e["runs"])
        lines.append("| " + " | ".join([*_settings_text(e["settings"], group_fields), runs,
                                        _num(e["test_accuracy_mean"]), _num(e["test_accuracy_std"]),
                                        _num(e["train_accuracy_mean"]), _num(e["test_loss_mean"])]) + " |")
    lines += ["", "## Runs", "",
              "| " + " | ".join([*fields, "status", "train loss", "train acc", "test loss", "test acc",
                                 "time (s)", "runs together"]) + " |",
              "|" + "---|" * (len(fields) + 7)]
    for row in rows:
        lines.append("| " + " | ".join([*_settings_text(row["settings"], fields), row["status"],
                                        _num(row["train_loss"]), _num(row["train_accuracy"]),
                                        _num(row["test_loss"]), _num(row["test_accuracy"]),
                                        f"{row['time_s']:.1f}", str(row["group_size"])]) + " |")
    lines += ["", "Time is the wall-clock time of the run's group: runs trained together (vmapped) share it.",
              "Std is the sample standard deviation over seeds."]
    if plot_name:
        lines += ["", f"![test accuracy]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_axis(rows: Sequence[dict[str, Any]]) -> str | None:
    """The field on the plot's x axis: the numeric swept field (not seed) with the most values,
    else any swept field but seed with several values, else seed."""
    fields = swept_fields(rows)
    counts = {f: len({json.dumps(r["settings"].get(f)) for r in rows}) for f in fields}
    numeric = [f for f in fields if f != "seed" and _field_kind(f) in (int, float) and counts[f] > 1]
    if numeric:
        return max(numeric, key=lambda f: (counts[f], f == "learning_rate"))
    others = [f for f in fields if f != "seed" and counts[f] > 1]
    if others:
        return others[0]
    return "seed" if "seed" in fields else None


def results_figure(rows: Sequence[dict[str, Any]]):
    """Test accuracy (mean over seeds, std as error bars) against the swept value, one line per
    combination of the other swept settings."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_field = plot_axis(rows)
    fields = [f for f in swept_fields(rows) if f not in ("seed", x_field)]
    numeric = x_field is not None and _field_kind(x_field) in (int, float)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    ok = [r for r in rows if r["status"] == "ok"]
    # Runs of another sweep kept in the same folder may lack the x field: they are in the tables only.
    plotted = [r for r in ok if x_field is None or x_field in r["settings"]]
    series: dict[str, dict[Any, list[float]]] = {}
    for r in plotted:
        label = ", ".join(t for t in _settings_text(r["settings"], fields) if t) or "all runs"
        x = r["settings"].get(x_field) if x_field else 0
        x = tuple(x) if isinstance(x, list) else x
        series.setdefault(label, {}).setdefault(x, []).append(r["test_accuracy"])
    categories = sorted({x for s in series.values() for x in s}, key=lambda v: (str(type(v)), v))
    log_x = bool(numeric and categories and min(categories) > 0 and max(categories) / min(categories) >= 10)
    for k, (label, points) in enumerate(sorted(series.items())):
        xs = sorted(points, key=lambda v: (str(type(v)), v))
        means = [float(np.mean(points[x])) for x in xs]
        stds = [float(np.std(points[x], ddof=1)) if len(points[x]) > 1 else 0.0 for x in xs]
        # Lines are nudged sideways a little so that their error bars do not hide each other.
        nudge = (k - (len(series) - 1) / 2) * 0.015
        if not numeric:
            pos = [categories.index(x) + nudge * 4 for x in xs]
        elif log_x:
            pos = [x * 10 ** (nudge * math.log10(max(categories) / min(categories))) for x in xs]
        else:
            pos = [x + nudge * (max(categories) - min(categories)) for x in xs]
        ax.errorbar(pos, means, yerr=stds, marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    if categories:
        ax.set_xticks(categories if numeric else range(len(categories)),
                      [format_value(c) for c in categories])
        ax.minorticks_off()
    n_seeds = max((len(v) for s in series.values() for v in s.values()), default=1)
    ax.set_xlabel(x_field or "")
    ax.set_ylabel("final test accuracy" + (f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else ""))
    failed = len(rows) - len(ok)
    ax.set_title(f"Sweep: test accuracy vs {x_field} ({len(plotted)} runs"
                 + (f", {failed} diverged" if failed else "") + ")")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small", title=", ".join(fields) if fields else None, title_fontsize="small")
    return fig


def write_results(sweep_dir: str, rows: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Write results.csv, results.md and results.png (each atomically) from `rows` (default: every
    finished run directory of `sweep_dir`); return the rows."""
    from cnn_jax import plots

    rows = collect_rows(sweep_dir) if rows is None else list(rows)
    if not rows:
        return rows
    import matplotlib.pyplot as plt

    try:
        workdir_lib.atomic_write_text(os.path.join(sweep_dir, RESULTS_CSV), results_csv(rows))
        workdir_lib.atomic_write_text(os.path.join(sweep_dir, RESULTS_MD), results_markdown(rows))
        fig = results_figure(rows)
        try:
            plots.save_figure(fig, os.path.join(sweep_dir, RESULTS_PLOT))
        finally:
            plt.close(fig)
    except OSError as e:
        failed = workdir_lib.write_error(e.filename or sweep_dir, e)
        raise workdir_lib.WriteError(f"{failed}; every finished run's own files are kept: make room and "
                                     "write the tables again with --summarize") from None
    return rows
