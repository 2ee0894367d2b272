"""Grouping the runs of a sweep and training a group together: runs whose configs differ only
in `PER_RUN_FIELDS` are stacked along a leading run axis of the train state and trained by one
vmapped, jit-compiled step."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.data import sources as data_lib
from cnn_jax.engine import evaluation, optim, train
from cnn_jax.rundir import progress
from cnn_jax.engine import state as state_lib
from cnn_jax.engine import step as step_lib
from cnn_jax.config import Config, fields_with_role
from cnn_jax.engine.state import TrainState
from cnn_jax.sweep.spec import Run

# Fields that may differ between the runs of one group: the optimiser's hyperparameters (arrays
# in each run's optimiser state), the init scale and seed (each run's initial state is drawn
# alone; the seed also sets the data order) and host-side reporting knobs.
PER_RUN_FIELDS = optim.HYPERPARAMS + tuple(f for f in fields_with_role("per_run") if f not in optim.HYPERPARAMS)
# Fields that select the data: runs sharing them share one loaded dataset.
DATA_FIELDS = fields_with_role("data")


def group_key(config: Config) -> Config:
    """The config with every per-run field at its default: runs with equal keys share one program."""
    defaults = Config()
    return dataclasses.replace(config, **{f: getattr(defaults, f) for f in PER_RUN_FIELDS})


def data_key(config: Config) -> tuple[Any, ...]:
    """What selects the data: runs with equal keys share one loaded dataset."""
    return tuple(getattr(config, f) for f in DATA_FIELDS)


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


def group_state(configs: Sequence[Config], total_steps: int) -> TrainState:
    """The runs' initial train states stacked along a leading run axis: each run's own
    `state.create` (its init key and scale, its optimiser hyperparameters in the optimiser
    state), so each starts exactly where it would start alone."""
    return state_lib.stack([state_lib.create(c, optim.make_optimizer(c, total_steps)) for c in configs])


@functools.lru_cache(maxsize=16)
def compiled_group(key: Config, total_steps: int, loop: str):
    """The jitted runner of a group: `train.fit`'s step vmapped over the run axis of the state
    and of the batches. The per-run values it reads are in the state, so groups of one key
    compile once per size."""
    train_step = step_lib.make_train_step(key, optim.make_optimizer(key, total_steps))
    return step_lib.make_runner(key, jax.vmap(train_step), loop)


def resolve_loop(config: Config) -> str:
    """The execution strategy of a group: `--loop` when given, else train.py's (`scan`, but `step`
    for the lax convolution on CPU).

    A vmapped group runs steps inside `lax.scan` (in chunks of `log_every` steps, for
    progress and logs): on CPU that trains more images per second than one call per step, except
    with XLA:CPU's own (grouped) convolution, far slower in a loop (docs/sweeps.md, "Lowering under
    vmap")."""
    return train.resolve_loop(config)


@dataclasses.dataclass
class GroupResult:
    """What `train_group` returns: stacked final state, per-run records and outcome."""

    state: TrainState                       # leading axis: run
    logs: list[train.RunLog]                # per run, as `train.fit` keeps it
    diverged: list[str | None]              # why a run stopped (non-finite loss), or None
    test: dict[str, np.ndarray]             # last test evaluation, with predictions
    steps_per_epoch: int
    seconds: float                          # wall-clock time of the whole group

    @property
    def histories(self) -> list[list[dict[str, Any]]]:
        """One record per finished epoch and run, as `train.fit`'s."""
        return [log.history for log in self.logs]


def _noop(*args: Any) -> None:
    del args


def train_group(configs: Sequence[Config], dataset: data_lib.Dataset,
                on_log: Callable[[int, dict[str, Any]], None] = _noop,
                on_epoch: Callable[[int, dict[str, Any]], None] = _noop,
                validation: tuple[np.ndarray, np.ndarray] | None = None) -> GroupResult:
    """Train runs that share a `group_key` together; each computes what `train.fit` computes alone.

    on_log(run_index, record) gets `{"kind": "train", ...}` records every `log_every` steps,
    on_epoch(run_index, record) the per-epoch record. A run whose loss or params become
    non-finite is marked diverged (its history stops) while the others go on. With
    `validation` (images, labels held out of `dataset`'s training images: `data.hold_out`),
    each epoch's record also holds `validation_loss` and `validation_accuracy`.
    """
    keys = {group_key(c) for c in configs}
    if len(keys) != 1:
        raise ValueError("train_group needs configs that differ only in PER_RUN_FIELDS")
    start_time = time.perf_counter()
    config, num_runs = configs[0], len(configs)
    n = len(dataset.train_labels)
    num_steps = train.steps_per_epoch(config, n)
    loop = resolve_loop(config)
    runner = compiled_group(group_key(config), num_steps * config.epochs, loop)
    state = group_state(configs, num_steps * config.epochs)
    train_images, train_labels = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
    test_images, test_labels = jnp.asarray(dataset.test_images), jnp.asarray(dataset.test_labels)

    logs = [train.RunLog() for _ in configs]
    diverged: list[str | None] = [None] * num_runs
    log_every = min(c.log_every for c in configs)
    test: dict[str, np.ndarray] = {}
    for epoch in range(config.epochs):
        order = jnp.asarray(np.stack([data_lib.epoch_permutation(c.seed, epoch, n) for c in configs]))
        bar = progress.epoch_progress(epoch, num_steps)
        epoch_start = time.perf_counter()
        last_absorb = [epoch_start, epoch * num_steps]   # time, steps done

        def absorb(step_metrics: Any) -> None:
            """Bring the losses of the steps since the last call to the host: check, accumulate, log."""
            host = train.host_metrics(step_metrics)   # (steps, runs)
            now = time.perf_counter()
            ips = len(host["loss"]) * config.batch_size / max(now - last_absorb[0], 1e-9)
            for r, run_config in enumerate(configs):
                if diverged[r]:
                    continue
                records, diverged[r] = logs[r].absorb(host["loss"][:, r], host["correct"][:, r],
                                                      host["finite"][:, r], epoch, run_config, ips)
                for record in records:
                    on_log(r, record)
            last_absorb[:] = [now, last_absorb[1] + len(host["loss"])]
            live = [r for r in range(num_runs) if not diverged[r]]
            if live:
                bar.log(last_absorb[1], float(np.mean(host["loss"][-1, live])), ips * len(live))

        state, _ = train.run_epoch_steps(
            runner, loop, state, (train_images, train_labels), order, 0, num_steps,
            step_offset=epoch * num_steps, absorb_every=log_every, scan_chunk=log_every,
            absorb=absorb, bar=bar)   # scan: chunks of log_every steps, at most two lengths to compile
        bar.close()
        epoch_time = time.perf_counter() - epoch_start
        if all(diverged):
            break
        last = epoch == config.epochs - 1
        if config.train_eval == "full":
            train_eval = evaluation.evaluate_runs(state.params, state.model_state, train_images, train_labels,
                                                  config)
        else:
            runs = [log.running_train_eval(num_steps, config.batch_size) for log in logs]
            train_eval = {key: [r[key] for r in runs] for key in ("loss", "accuracy")}
        test = evaluation.evaluate_runs(state.params, state.model_state, test_images, test_labels, config,
                                        return_predictions=last)
        held_out = {"test": test}
        if validation is not None:
            held_out["validation"] = evaluation.evaluate_runs(state.params, state.model_state, *validation, config)
        for r in range(num_runs):
            if diverged[r]:
                continue
            record = logs[r].finish_epoch(
                epoch, {key: train_eval[key][r] for key in ("loss", "accuracy")},
                {split: {key: result[key][r] for key in ("loss", "accuracy")} for split, result in held_out.items()},
                epoch_time, num_steps * config.batch_size)
            on_epoch(r, record)
    return GroupResult(state, logs, diverged, test, num_steps, time.perf_counter() - start_time)
