"""Grouping the runs of a sweep and training a group together: runs whose configs differ only
in `PER_RUN_FIELDS` share one program (`engine.program`); a group of several trains as one
vmapped program, a group of one as the run trains alone."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Sequence

import numpy as np

from cnn_jax.config import Config, fields_with_role
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import loop, program as program_lib, state as state_lib
from cnn_jax.engine.runlog import RunLog, steps_per_epoch
from cnn_jax.engine.state import TrainState
from cnn_jax.sweep.spec import Run

# Fields that may differ between the runs of one group (`engine.program.PER_RUN_FIELDS`), and the
# fields that select the data (the role `data`): runs sharing them share one loaded dataset.
PER_RUN_FIELDS = program_lib.PER_RUN_FIELDS
DATA_FIELDS = fields_with_role("data")
group_key = program_lib.program_key


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


@dataclasses.dataclass
class GroupResult:
    """What `train_group` returns: per-run final states, records and outcome."""

    states: list[TrainState]                # per run (a diverged run's as it was when it stopped)
    logs: list[RunLog]                      # per run, as `train.fit` keeps it
    diverged: list[str | None]              # why a run stopped (non-finite loss), or None
    tests: list[dict[str, Any]]             # per run, the last test evaluation with predictions
    steps_per_epoch: int
    seconds: float                          # wall-clock time of the whole group

    @property
    def state(self) -> TrainState:
        """The runs' final states stacked along a leading run axis."""
        return state_lib.stack(self.states)

    @property
    def histories(self) -> list[list[dict[str, Any]]]:
        """One record per finished epoch and run, as `train.fit`'s."""
        return [log.history for log in self.logs]


def _noop(*args: Any) -> None:
    del args


def train_group(configs: Sequence[Config], dataset: data_lib.Dataset,
                on_log: Callable[[int, dict[str, Any]], None] = _noop,
                on_epoch: Callable[[int, dict[str, Any]], None] = _noop,
                validation: tuple[np.ndarray, np.ndarray] | None = None,
                progress: Callable[[int, int, int], Any] | None = None,
                programs: dict[tuple, program_lib.Program] | None = None) -> GroupResult:
    """Train runs that share a `group_key` together, through the training loop (`engine.loop`):
    one run trains its own program (the digits `train.fit` gives), several one vmapped program.

    on_log(run_index, record) gets `{"kind": "train", ...}` records every `log_every` steps,
    on_epoch(run_index, record) the per-epoch record. A run whose loss or params become
    non-finite is marked diverged (its history stops) while the others go on. With
    `validation` (images, labels held out of `dataset`'s training images: `data.sources.hold_out`),
    each epoch's record also holds `validation_loss` and `validation_accuracy`. `programs` (one
    dict for a whole sweep) reuses the programs of earlier groups (`engine.program.build`).
    """
    start_time = time.perf_counter()
    config = configs[0]
    num_steps = steps_per_epoch(config, len(dataset.train_labels))
    program, state = program_lib.build(configs, dataset, num_steps, programs=programs)
    held_out = {"test": (dataset.test_images, dataset.test_labels)}
    if validation is not None:
        held_out["validation"] = validation
    hooks = loop.Hooks(on_log=on_log, on_epoch=lambda r, log, record, state: on_epoch(r, record),
                       **({} if progress is None else {"progress": progress}))
    plan = loop.Plan(held_out, full_train=config.train_eval == "full", predictions=True)
    outcomes = loop.train_runs(configs, dataset, program, state, [RunLog() for _ in configs], hooks, plan)
    return GroupResult([o.state for o in outcomes], [o.log for o in outcomes],
                       [o.message if o.status == loop.DIVERGED else None for o in outcomes],
                       [o.held_out.get("test", {}) for o in outcomes], num_steps, time.perf_counter() - start_time)
