"""`fit`: one run trained by the loop (`engine.loop`), from a fresh state or a checkpoint; a
`Session` is one run prepared (its program built, its fresh state drawn) before it trains.

The pieces other modules and tests reach through here (the RunLog, the epoch line, the
compiled single-run runner) live in `engine.runlog` and `engine.program`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from cnn_jax.config import Config
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import loop, program as program_lib
from cnn_jax.engine.loop import Stopped  # noqa: F401 - part of this module's API
from cnn_jax.engine.program import compile_ahead, compiled_runner, resolve_loop, whole_epoch_runner  # noqa: F401
from cnn_jax.engine.runlog import (Record, RunLog, format_epoch, host_metrics, moving_average,  # noqa: F401
                                   steps_per_epoch)
from cnn_jax.engine.state import TrainState


def _no_op(*args: Any) -> None:
    del args


@dataclasses.dataclass
class Hooks:
    """What `fit` calls besides training; the defaults do nothing (no workdir).

    start(session):             where the prepared run starts: None for its fresh state, or a
                                (state, log) it continues (a workdir restores its checkpoint here)
    on_log(record):             every `log_every` steps, a {"kind": "train", ...} record
    on_epoch(state, log, rec):  after each epoch's evaluation (a workdir saves metrics and a checkpoint)
    should_stop(step):          polled after every step; True makes `fit` call on_stop, then raise Stopped
    on_stop(state, log):        the state to save before stopping (mid-epoch, or right after an epoch)
    on_finish(session, state, history): after the last epoch (a workdir writes its results and plots)
    progress(epoch, steps, first): the epoch's progress reporter (silent by default)
    """

    start: Callable[[Session], tuple[TrainState, RunLog] | None] = lambda session: None
    on_log: Callable[[Record], None] = _no_op
    on_epoch: Callable[[TrainState, RunLog, Record], None] = _no_op
    should_stop: Callable[[int], bool] = lambda step: False
    on_stop: Callable[[TrainState, RunLog], None] = _no_op
    on_finish: Callable[[Session, TrainState, list[Record]], None] = _no_op
    progress: Callable[[int, int, int], Any] | None = None
    print_fn: Callable[[str], None] = print


@dataclasses.dataclass
class Session:
    """One run ready to train, built once from its config: the data, the steps per epoch, the
    program (`engine.program.build`) and the fresh state on the program's devices. What comes
    after (a checkpoint restored into its state, training, the final evaluation) needs no config."""

    config: Config
    dataset: data_lib.Dataset
    steps_per_epoch: int
    program: program_lib.Program
    state: TrainState


def prepare(config: Config, dataset: data_lib.Dataset, state: TrainState | None = None) -> Session:
    """The session of `config` on `dataset`, starting from `state` (default: a fresh one)."""
    num_steps = steps_per_epoch(config, len(dataset.train_labels))
    program, state = program_lib.build([config], dataset, num_steps, state)
    return Session(config, dataset, num_steps, program, state)


def fit(config: Config, dataset: data_lib.Dataset, start: tuple[TrainState, RunLog] | None = None,
        hooks: Hooks | None = None) -> tuple[TrainState, list[Record]]:
    """Train on `dataset` from `start` (default: `hooks.start`'s, a fresh state unless it gives
    one); return (final state, history).

    A `start` taken mid-epoch continues that epoch's permutation after the `log.step` batches
    already done, with its moving loss and partial sums, so a resumed run computes what an
    uninterrupted one does. A non-finite loss or parameter raises FloatingPointError naming the
    step. The strategy line and the epoch lines go to `hooks.print_fn`."""
    hooks = hooks or Hooks()
    session = prepare(config, dataset, None if start is None else start[0])   # a saved state is placed once
    start = hooks.start(session) if start is None else (session.state, start[1])
    state, history = fit_session(session, start, hooks)
    hooks.on_finish(session, state, history)
    return state, history


def fit_session(session: Session, start: tuple[TrainState, RunLog] | None = None,
                hooks: Hooks | None = None) -> tuple[TrainState, list[Record]]:
    """`fit` of a prepared session, from its state or from `start` (a restored state and its log)."""
    hooks = hooks or Hooks()
    config, dataset, program = session.config, session.dataset, session.program
    hooks.print_fn(program.describe)

    def on_epoch(r: int, log: RunLog, record: Record, state: Callable[[], TrainState]) -> None:
        hooks.print_fn(format_epoch(record))
        hooks.on_epoch(state(), log, record)

    engine_hooks = loop.Hooks(
        on_log=lambda r, record: hooks.on_log(record), on_epoch=on_epoch, should_stop=hooks.should_stop,
        on_stop=lambda r, state, log: hooks.on_stop(state, log),
        **({} if hooks.progress is None else {"progress": hooks.progress}))
    plan = loop.Plan({"test": (dataset.test_images, dataset.test_labels)}, full_train=config.train_eval == "full")
    state, log = (session.state, RunLog()) if start is None else (program.place(start[0]), start[1])
    outcome, = loop.train_runs([config], dataset, program, state, [log], engine_hooks, plan)
    if outcome.status == loop.DIVERGED:
        raise FloatingPointError(outcome.message)
    return outcome.state, outcome.log.history
