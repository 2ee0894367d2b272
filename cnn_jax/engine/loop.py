"""The training loop, written once: R runs of one program (R = 1 for a plain run), epoch by epoch.

`train_runs` trains runs whose configs share `program.program_key` from their states, with
evaluation points inside epochs (`Plan.eval_every`), per-run stop decisions (diverged, pruned by
`Hooks.decide`, finished) and hooks for logging, epoch records, checkpoints and stop requests. A
run stopped mid-epoch (a checkpoint) continues that epoch's permutation after the steps already
done, so a resumed run computes what an uninterrupted one does. `engine.train.fit`, the sweep's
groups and the search's batches are short set-ups around it.

A run whose loss, parameters or optimiser state become non-finite stops at the next evaluation
point or epoch end (its record stops at the step it diverged); the others go on. Runs that stop
leave the stacked program, and the rest go on as a smaller group.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np

from cnn_jax.config import Config
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import state as state_lib
from cnn_jax.engine.program import Program, take
from cnn_jax.engine.runlog import Record, RunLog, host_metrics, steps_per_epoch
from cnn_jax.engine.state import TrainState

COMPLETE, PRUNED, DIVERGED = "complete", "pruned", "diverged"


def _no_op(*args: Any) -> None:
    del args


class SilentProgress:
    """A progress reporter that reports nothing (the default: the caller chooses what is shown)."""

    def advance(self, steps: int = 1) -> None:
        del steps

    def log(self, step: int, loss: float, images_per_second: float) -> None:
        del step, loss, images_per_second

    def close(self) -> None:
        pass


@dataclasses.dataclass
class Hooks:
    """What the loop calls besides training, each with the run's index; the defaults do nothing.

    on_log(r, record):              every `log_every` steps, a {"kind": "train", ...} record
    on_evaluation(r, record):       at each evaluation point, {"evaluation": n, "step", "epoch", ...}
    decide(runs, records) -> stop:  after each evaluation point: which runs to prune (not at the last)
    on_epoch(r, log, record, state): after each epoch's evaluation; `state()` gives the run's state
    on_finish(r, outcome):          a run ended (complete, pruned or diverged)
    should_stop(step) -> bool:      polled after every step (one call per batch) and epoch
    on_stop(r, state, log):         the state to save before `Stopped` is raised
    progress(epoch, steps, first):  a progress reporter for the epoch (advance, log, close)
    """

    on_log: Callable[[int, Record], None] = _no_op
    on_evaluation: Callable[[int, Record], None] = _no_op
    decide: Callable[[list[int], list[Record]], Sequence[bool]] = lambda runs, records: [False] * len(runs)
    on_epoch: Callable[[int, RunLog, Record, Callable[[], TrainState]], None] = _no_op
    on_finish: Callable[[int, "Outcome"], None] = _no_op
    should_stop: Callable[[int], bool] = lambda step: False
    on_stop: Callable[[int, TrainState, RunLog], None] = _no_op
    progress: Callable[[int, int, int], Any] = lambda epoch, steps, first: SilentProgress()


@dataclasses.dataclass(frozen=True)
class Plan:
    """What is evaluated: `held_out` splits (name -> (images, labels)) after every epoch, the
    training set in full or as taken during the epoch (`full_train`), and `eval_split` of them
    at evaluation points every `eval_every` steps within an epoch and at its end (0 / None: none)."""

    held_out: dict[str, tuple[Any, Any]]
    full_train: bool
    eval_split: str | None = None
    eval_every: int = 0
    predictions: bool = False     # keep the last epoch's held-out predictions in the outcome


@dataclasses.dataclass
class Outcome:
    """What one run ended with."""

    status: str                          # complete | pruned | diverged
    message: str                         # why it stopped early ("" when complete)
    state: TrainState | None             # its final state (None for a diverged run); on the device for one run
    log: RunLog                          # steps done, moving loss, epoch sums, per-epoch history
    evaluations: list[Record]            # one record per evaluation point it reached
    held_out: dict[str, dict[str, Any]]  # the last epoch's held-out results (with predictions if planned)
    seconds: float                       # wall time from the start to this run's end


class Stopped(Exception):
    """Training stopped early because `Hooks.should_stop` asked it to, after `Hooks.on_stop`."""

    def __init__(self, step: int):
        super().__init__(f"training stopped at step {step}")
        self.step = step


@dataclasses.dataclass
class _Runs:
    """The loop's own state: the runs still training and what is known of each."""

    configs: Sequence[Config]
    program: Program
    hooks: Hooks
    plan: Plan
    state: TrainState                    # of the live runs, stacked in `live` order when the program is
    live: list[int]
    logs: list[RunLog]
    num_steps: int
    data: tuple                          # training images and labels, placed for the program
    held_out: dict[str, tuple]           # the plan's held-out splits, placed for the program
    outcomes: list[Outcome | None]
    evaluations: list[list[Record]]
    results: list[dict[str, dict[str, Any]]]   # each run's last held-out results
    diverged: dict[int, str] = dataclasses.field(default_factory=dict)
    start: float = dataclasses.field(default_factory=time.perf_counter)
    points: int = 0                      # evaluation points passed

    def slot_state(self, slot: int) -> TrainState:
        return self.state if not self.program.stacked else state_lib.unstack(self.state, slot)

    def finish(self, slot: int, status: str, message: str) -> None:
        r = self.live[slot]
        self.outcomes[r] = Outcome(status, message, self.slot_state(slot), self.logs[r], self.evaluations[r],
                                   self.results[r], time.perf_counter() - self.start)
        self.hooks.on_finish(r, self.outcomes[r])

    def drop(self, stopped: set[int]) -> None:
        keep = [slot for slot, r in enumerate(self.live) if r not in stopped]
        if len(keep) < len(self.live) and keep and self.program.stacked:
            self.state = take(self.state, keep)
        self.live = [self.live[slot] for slot in keep]

    def evaluate(self, split_data: tuple, predictions: bool = False) -> list[dict[str, Any]]:
        return self.program.evaluate(self.state, *split_data, predictions)


def _absorb(runs: _Runs, epoch: int, step_metrics: Any, bar: Any, since: float) -> None:
    """The metrics of the steps since the last call into each live run's RunLog: check, log."""
    host = host_metrics(step_metrics)   # (steps,) or (steps, runs)
    ips = len(host["loss"]) * runs.configs[0].batch_size / max(time.perf_counter() - since, 1e-9)
    for slot, r in enumerate(runs.live):
        if r in runs.diverged:
            continue
        column = (lambda key: host[key][:, slot]) if runs.program.stacked else host.get
        records, why = runs.logs[r].absorb(column("loss"), column("correct"), column("finite"), epoch,
                                           runs.configs[r], ips)
        for record in records:
            runs.hooks.on_log(r, record)
            if not runs.program.stacked:
                bar.log(record["step"], record["loss"], ips)
        if why:
            runs.diverged[r] = why
    alive = [slot for slot, r in enumerate(runs.live) if r not in runs.diverged]
    if runs.program.stacked and alive:
        bar.log(runs.logs[runs.live[alive[0]]].step, float(np.mean(host["loss"][-1, alive])), ips * len(alive))


def _run_steps(runs: _Runs, epoch: int, order: Any, first: int, last: int, bar: Any) -> bool:
    """Steps [first, last) of the epoch; True when `should_stop` asked to stop before `last`.
    One call per batch (`step` loop, metrics absorbed every `log_every` steps) or calls of whole
    spans (`scan` loop; a stacked program in spans of `log_every` steps, for progress)."""
    runner, offset = runs.program.runner, epoch * runs.num_steps
    every = min(c.log_every for c in runs.configs)
    since = time.perf_counter()
    if runs.program.loop == "step":
        pending = []
        for index in range(first, last):
            runs.state, metrics = runner(runs.state, *runs.data, order, np.int32(index))
            pending.append(metrics)
            bar.advance()
            done = offset + index + 1
            stop = index < runs.num_steps - 1 and runs.hooks.should_stop(done)
            if done % every == 0 or index == last - 1 or stop:
                _absorb(runs, epoch, pending, bar, since)
                pending, since = [], time.perf_counter()
            if stop:
                return True
        return False
    chunk = every if runs.program.stacked else last - first
    for start in range(first, last, chunk):
        count = min(chunk, last - start)
        runs.state, metrics = runner(runs.state, *runs.data, order, np.int32(start), count)
        bar.advance(count)
        _absorb(runs, epoch, metrics, bar, since)
        since = time.perf_counter()
    return False


def _drop_diverged(runs: _Runs) -> None:
    """Runs that diverged since the last check end (their state as it is) and leave the program."""
    ended = {r for r in runs.live if r in runs.diverged}
    for slot, r in enumerate(runs.live):
        if r in ended:
            runs.finish(slot, DIVERGED, runs.diverged[r])
    runs.drop(ended)


def _point_records(runs: _Runs, epoch: int, step: int, results: list[dict[str, Any]]) -> list[Record]:
    """The records of an evaluation point, one per live run (`on_evaluation`)."""
    runs.points += 1
    split, records = runs.plan.eval_split, []
    for slot, r in enumerate(runs.live):
        record = {"evaluation": runs.points, "step": step, "epoch": epoch,
                  f"{split}_loss": float(results[slot]["loss"]), f"{split}_accuracy": float(results[slot]["accuracy"])}
        runs.evaluations[r].append(record)
        runs.hooks.on_evaluation(r, record)
        records.append(record)
    return records


def _prune(runs: _Runs, step: int, records: list[Record]) -> None:
    """The prune decisions after an evaluation point; at the last one they are asked (a pruner
    records the value) but not followed: a run that reached its end is complete."""
    stop = list(runs.hooks.decide(list(runs.live), records))
    if step == runs.num_steps * runs.configs[0].epochs:
        return
    pruned = {r for r, s in zip(runs.live, stop) if s}
    for slot, r in enumerate(runs.live):
        if r in pruned:
            runs.finish(slot, PRUNED, f"pruned after evaluation {runs.points} (step {step})")
    runs.drop(pruned)


def _end_epoch(runs: _Runs, epoch: int, epoch_time: float, images: int) -> None:
    """The epoch's evaluations, its evaluation point (if planned), records and prune decisions."""
    last = epoch == runs.configs[0].epochs - 1
    held_out = {split: runs.evaluate(data, runs.plan.predictions and last) for split, data in runs.held_out.items()}
    records = (_point_records(runs, epoch, runs.logs[runs.live[0]].step, held_out[runs.plan.eval_split])
               if runs.plan.eval_split else [])
    if runs.plan.full_train:
        train = runs.evaluate(runs.data)
    else:
        train = [runs.logs[r].running_train_eval(runs.num_steps, runs.configs[r].batch_size) for r in runs.live]
    for slot, r in enumerate(runs.live):
        runs.results[r] = {split: results[slot] for split, results in held_out.items()}
        record = runs.logs[r].finish_epoch(epoch, train[slot], runs.results[r], epoch_time, images)
        runs.hooks.on_epoch(r, runs.logs[r], record, lambda slot=slot: runs.slot_state(slot))
    if records:
        _prune(runs, runs.logs[runs.live[0]].step, records)


def _stop_requested(runs: _Runs) -> None:
    """Save every live run (`on_stop`) and raise Stopped."""
    for slot, r in enumerate(runs.live):
        runs.hooks.on_stop(r, runs.slot_state(slot), runs.logs[r])
    raise Stopped(runs.logs[runs.live[0]].step)


def _epoch(runs: _Runs, epoch: int) -> None:
    """One epoch (or the rest of one) for the live runs, with its evaluation points."""
    n = len(runs.data[1])
    first = runs.logs[runs.live[0]].step - epoch * runs.num_steps
    if first == 0:
        for r in runs.live:
            runs.logs[r].epoch_losses, runs.logs[r].epoch_correct = [], 0
    orders = {r: data_lib.epoch_permutation(runs.configs[r].seed, epoch, n) for r in runs.live}
    every = runs.plan.eval_every if runs.plan.eval_split else 0
    ends = [s for s in range(every, runs.num_steps, every) if s > first] if every else []
    bar, seconds, start = runs.hooks.progress(epoch, runs.num_steps, first), 0.0, first
    for end in ends + [runs.num_steps]:
        order = runs.program.place(np.stack([orders[r] for r in runs.live]) if runs.program.stacked
                                   else orders[runs.live[0]])
        began = time.perf_counter()
        stopped = _run_steps(runs, epoch, order, start, end, bar)
        seconds += time.perf_counter() - began
        if stopped:
            bar.close()
            _stop_requested(runs)
        _drop_diverged(runs)
        if not runs.live:
            break
        if end < runs.num_steps:
            step = epoch * runs.num_steps + end
            _prune(runs, step, _point_records(runs, epoch, step, runs.evaluate(runs.held_out[runs.plan.eval_split])))
            if not runs.live:
                break
        start = end
    bar.close()
    if runs.live:
        _end_epoch(runs, epoch, seconds, (runs.num_steps - first) * runs.configs[0].batch_size)


def train_runs(configs: Sequence[Config], dataset: data_lib.Dataset, program: Program, state: TrainState,
               logs: Sequence[RunLog], hooks: Hooks, plan: Plan) -> list[Outcome]:
    """Train `configs` (one program key) on `dataset` from `state` and `logs` (all runs at the
    same step); return each run's outcome, in the order of `configs`."""
    num_steps = steps_per_epoch(configs[0], len(dataset.train_labels))
    runs = _Runs(configs, program, hooks, plan, state, list(range(len(configs))), [log.copy() for log in logs],
                 num_steps, program.place((dataset.train_images, dataset.train_labels)),
                 {split: program.place(data) for split, data in plan.held_out.items()},
                 [None] * len(configs), [[] for _ in configs], [{} for _ in configs])
    for epoch in range(runs.logs[0].step // num_steps, configs[0].epochs):
        _epoch(runs, epoch)
        if not runs.live:
            break
        if epoch < configs[0].epochs - 1 and hooks.should_stop(runs.logs[runs.live[0]].step):
            _stop_requested(runs)
    for slot in range(len(runs.live)):
        runs.finish(slot, COMPLETE, "")
    return runs.outcomes   # type: ignore[return-value]
