"""The worker loop: ask K trials, train them in vmapped groups, tell the results; keep run directories.

`run_worker` repeats, until the study has `--trials` finished trials (across all workers):
mark dead workers' trials failed (re-queued by the storage's callback), ask a batch within
the budget (`study.ask_batch`), group it by shape (`sweep.group_runs`), train each group
with `trials.train_trials`, reporting every evaluation to Optuna and dropping the trials its
pruner stops, and tell each trial's outcome as soon as it has one. With nothing to ask it
waits while other workers' trials run. A worker stopped by an error or SIGINT tells its
unfinished trials failed and re-queues them with the same parameters.

Storage outages (`cnn_jax.search.storage`): while a group trains, its reports and results wait
out an outage and the group trains on; at the group's end the worker waits up to
--storage_timeout for the storage, then stops with `StorageUnavailable`. What finished is in
its run directory, and the next run tells it first (`report_kept`), so it is not trained again.

Each trial keeps a run directory `trial_NNNNN` in the search directory of the machine that
trained it, in the layout of `experiments/train.py --workdir` plus `trial_result.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import os
import socket
import time
from typing import Any, Callable

import numpy as np
import optuna

from cnn_jax.data import sources as data_lib
from cnn_jax import sweep
from cnn_jax.engine import evaluation, state as state_lib, train
from cnn_jax.rundir import lock, report
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.config import Config
from cnn_jax.search import space as space_lib
from cnn_jax.search import storage as storage_lib
from cnn_jax.search import study as study_lib
from cnn_jax.search import trials as trials_lib
from cnn_jax.search.study import Heartbeats, Settings

TRIAL_RESULT_FILE = "trial_result.json"


def _trial_dir(search_dir: str, number: int) -> str:
    return os.path.join(search_dir, f"trial_{number:05d}")


@dataclasses.dataclass
class WorkerReport:
    trained: int = 0
    complete: int = 0
    pruned: int = 0
    diverged: int = 0
    lost: int = 0          # trials failed as stale by another worker while this one trained them
    reported: int = 0      # trials finished by an earlier run and told by this one (report_kept)
    seconds: float = 0.0


def _objective_value(settings: Settings, evaluation: dict[str, Any]) -> float:
    key = "validation_loss" if settings.objective.endswith("_loss") else "validation_accuracy"
    return evaluation[key]


def run_worker(study: optuna.Study, storage: optuna.storages.RDBStorage, settings: Settings,
               search_dir: str, total: int, batch: int, load_dataset: Callable[[Config], data_lib.Dataset],
               heartbeat_interval: float, max_parallel: int | Callable[[Config], int] = sweep.default_max_parallel,
               print_fn: Callable[[str], None] = print) -> WorkerReport:
    """Ask, train and tell batches until `total` trials of the study have finished (across all
    workers); wait while others' trials run, taking over those whose worker died."""
    result = WorkerReport()
    start = time.perf_counter()
    heartbeats = Heartbeats(storage, heartbeat_interval)
    datasets: dict[tuple, tuple] = {}
    programs: dict[tuple, Any] = {}   # the compiled programs, reused by the next batches (`engine.program.build`)
    waiting_said = False
    try:
        report_kept(study, settings, search_dir, result, print_fn)
        while True:
            study_lib.fail_stale(study)
            trials = study.get_trials(deepcopy=False)
            if study_lib.finished_count(trials) >= total:
                break
            asked = study_lib.ask_batch(study, settings, total, batch, heartbeats)
            if not asked:
                if not waiting_said:
                    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
                    print_fn(f"waiting for {running} trial(s) that other workers are training "
                             f"({study_lib.finished_count(trials)}/{total} finished)")
                    waiting_said = True
                time.sleep(heartbeat_interval)
                continue
            waiting_said = False
            _train_batch(study, settings, search_dir, asked, load_dataset, (datasets, programs), heartbeats,
                         max_parallel, result, print_fn)
    finally:
        heartbeats.close()
        result.seconds = time.perf_counter() - start
    return result


def save_trial(path: str, config: Config, outcome: trials_lib.TrialResult, dataset: data_lib.Dataset,
               row: dict[str, Any]) -> dict[str, Any] | None:
    """Finish a trial's run directory: a checkpoint of its final params (unless it diverged), for a
    completed trial its test results (results.json, also added to `row`), and last the row as
    trial_result.json. Returns the test results, or None."""
    from cnn_jax.rundir import checkpoint  # orbax is only needed here

    test = None
    if outcome.params is not None:
        if outcome.status == trials_lib.COMPLETE:
            result = evaluation.evaluate(state_lib.eval_params(outcome.state), outcome.state.model_state,
                                         dataset.test_images,
                                         dataset.test_labels, config, return_predictions=True)
            confusion = report.confusion_matrix(dataset.test_labels, np.asarray(result["predictions"]),
                                                dataset.num_classes)
            test = {"loss": float(result["loss"]), "accuracy": float(result["accuracy"]),
                    "confusion": confusion, "per_class_accuracy": report.per_class_accuracy(confusion)}
            workdir_lib.write_json(os.path.join(path, workdir_lib.RESULTS_FILE),
                                   report.results_json(test, dataset.class_names, outcome.step))
            row.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
        steps_per_epoch = train.steps_per_epoch(config, len(dataset.train_labels))
        manager = checkpoint.open_manager(path)
        try:
            checkpoint.save(manager, outcome.state, checkpoint.checkpoint_meta(outcome.log, config, steps_per_epoch))
        finally:
            manager.close()
    workdir_lib.write_json(os.path.join(path, TRIAL_RESULT_FILE), row)
    return test


class _Deferred:
    """Storage writes made while trials train, in order; during a storage outage they wait here
    (the trials train on) and are made when it is back (`flush`)."""

    def __init__(self, guard: storage_lib.Guard):
        self._guard = guard
        self._pending: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def do(self, write: Callable[[], None]) -> bool:
        """Make `write` now if the storage answers (and nothing waits before it); else keep it.
        Returns whether it was made."""
        self._pending.append(write)
        return self.flush(wait=False)

    def flush(self, wait: bool) -> bool:
        """Make the kept writes in order; `wait`: through an outage (up to the guard's timeout,
        then `StorageUnavailable`), else stop at the first that finds the storage unreachable.
        Returns whether none is left."""
        while self._pending:
            try:
                with self._guard.deferring() if not wait else contextlib.nullcontext():
                    self._pending[0]()
            except storage_lib.StorageDown:
                return False
            self._pending.pop(0)
        return True


def _train_batch(study, settings, search_dir, asked, load_dataset, loaded, heartbeats, max_parallel,
                 result, print_fn) -> None:
    """Train one asked batch: its trials grouped by shape (`sweep.group_runs`), each group trained
    by `_train_group`. On SIGINT or an error nothing asked is lost: what was not finished is told
    failed and re-queued."""
    guard = storage_lib.guard_of(study._storage)
    datasets, programs = loaded
    runs = [sweep.Run(f"trial_{t.number:05d}", dict(t.params), study_lib.trial_config(settings, t.params)) for t in asked]
    by_name = {run.name: trial for run, trial in zip(runs, asked)}
    untold = {t.number for t in asked}     # not finished: failed and re-queued if the worker stops
    deferred = _Deferred(guard)
    try:
        for group in sweep.group_runs(runs, max_parallel):
            key = sweep.data_key(group[0].config)
            if key not in datasets:
                datasets[key] = study_lib.split_validation(load_dataset(group[0].config), settings)
            tells = _GroupTells(study, settings, [by_name[r.name] for r in group], heartbeats, result, print_fn,
                                guard, deferred)
            _train_group(search_dir, group, tells, datasets[key], untold, programs)
    except storage_lib.StorageUnavailable:
        raise   # what is unfinished stays RUNNING: its heartbeats stop, and a rerun re-queues it
    except BaseException:
        with contextlib.suppress(Exception):
            deferred.flush(wait=False)
        with guard.deferring():
            for trial in asked:
                if trial.number in untold:
                    heartbeats.remove(trial._trial_id)
                    try:
                        trial.set_user_attr("outcome", "interrupted")
                        study.tell(trial, state=optuna.trial.TrialState.FAIL)
                        study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
                    except Exception:
                        pass   # the storage is gone too: the heartbeat grace period will re-queue it
        raise


@dataclasses.dataclass
class _GroupTells:
    """A group's contact with the study while it trains: reports, pruning questions and tells.

    The storage writes made while a group trains defer during an outage (`_Deferred`): the group
    trains on, unpruned, and its writes are made once the storage is back, at the latest when the
    group ends (waiting up to --storage_timeout there)."""

    study: optuna.Study
    settings: Settings
    trials: list[optuna.Trial]
    heartbeats: Heartbeats
    result: WorkerReport
    print_fn: Callable[[str], None]
    guard: Any
    deferred: _Deferred
    abandoned: set[int] = dataclasses.field(default_factory=set)   # failed as stale by another worker

    def report(self, i: int, value: float, step: int) -> None:
        if i in self.abandoned:
            return
        try:
            self.trials[i].report(value, step)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.abandoned.add(i)   # failed as stale by another worker, who re-queued it

    def decide(self, members: list[int], evaluations: list[dict[str, Any]]) -> list[bool]:
        stop = []
        for i, ev in zip(members, evaluations):
            self.deferred.do(functools.partial(self.report, i, _objective_value(self.settings, ev), ev["evaluation"]))
            prune = False
            if not len(self.deferred) and i not in self.abandoned:
                try:
                    with self.guard.deferring():
                        prune = self.trials[i].should_prune()
                except storage_lib.StorageDown:
                    pass   # the storage is away: no pruning until it is back
            stop.append(prune or i in self.abandoned)
        return stop

    def tell(self, i: int, outcome: trials_lib.TrialResult, row: dict[str, Any]) -> None:
        trial = self.trials[i]
        if i in self.abandoned:
            self.heartbeats.remove(trial._trial_id)
            self.result.lost += 1
            self.print_fn(f"trial {trial.number}: another worker marked it failed (no heartbeat within the "
                          "grace period) and re-queued it; dropped here")
            return
        try:
            _tell(self.study, trial, self.settings, row)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.heartbeats.remove(trial._trial_id)
            self.result.lost += 1
            return
        self.heartbeats.remove(trial._trial_id)
        self.result.trained += 1
        setattr(self.result, outcome.status, getattr(self.result, outcome.status) + 1)
        last = outcome.evaluations[-1] if outcome.evaluations else None
        shown = f"{self.settings.objective}={_objective_value(self.settings, last):.4f}" if last else ""
        self.print_fn(f"trial {trial.number}: {outcome.status} at step {outcome.step} {shown}"
                      + (f" ({outcome.message})" if outcome.message else ""))


def _train_group(search_dir: str, group: list, tells: _GroupTells, data: tuple, untold: set[int],
                 programs: dict[tuple, Any]) -> None:
    """Train one group's trials in their run directories (each locked while it trains), telling
    each trial's outcome as soon as it has one."""
    train_data, val_images, val_labels = data
    paths = [_trial_dir(search_dir, t.number) for t in tells.trials]
    with contextlib.ExitStack() as locks:   # one writer per trial directory
        for path in paths:
            locks.enter_context(lock.hold(path))
        for path, r in zip(paths, group):
            workdir_lib.start(path, r.config, overwrite=True)
        logs = [workdir_lib.MetricsLog(path) for path in paths]
        tells.print_fn(f"training trial(s) {', '.join(str(t.number) for t in tells.trials)} together: "
                       + "  ".join(f"#{t.number} " + space_lib.describe_params(t.params) for t in tells.trials))

        def on_stop(i: int, outcome: trials_lib.TrialResult) -> None:
            trial = tells.trials[i]
            logs[i].flush()
            row = {"number": trial.number, "params": trial.params, "status": outcome.status,
                   "message": outcome.message, "step": outcome.step, "evaluations": outcome.evaluations,
                   "seconds": outcome.seconds, "group_size": len(group), "worker": _worker()}
            save_trial(paths[i], group[i].config, outcome, train_data, row)
            untold.discard(trial.number)   # kept in its run directory: told now, later, or by a rerun
            tells.deferred.do(functools.partial(tells.tell, i, outcome, {**row, "run_dir": paths[i]}))

        trials_lib.train_trials([r.config for r in group], train_data, val_images, val_labels,
                                tells.settings.eval_every, tells.decide, lambda i, record: logs[i].append(record),
                                on_stop, programs)
        tells.deferred.flush(wait=True)   # still holding the directories: no rerun reports them meanwhile


def _tell(study: optuna.Study, trial: optuna.Trial, settings: Settings, row: dict[str, Any]) -> None:
    """Tell the study a finished trial's outcome, as recorded in its `trial_result.json` row (plus
    its run directory)."""
    for key, value in (("outcome", row["status"]), ("run_dir", os.path.abspath(row["run_dir"])),
                       ("worker", row["worker"]), ("seconds", row["seconds"]), ("group_size", row["group_size"])):
        trial.set_user_attr(key, value)
    if "test_accuracy" in row:
        trial.set_user_attr("test_accuracy", row["test_accuracy"])
        trial.set_user_attr("test_loss", row["test_loss"])
    if row["status"] == trials_lib.COMPLETE:
        study.tell(trial, _objective_value(settings, row["evaluations"][-1]))
    else:   # pruned, or diverged: worse than any trial that finished
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)


def report_kept(study: optuna.Study, settings: Settings, search_dir: str, result: WorkerReport,
                print_fn: Callable[[str], None] = print) -> int:
    """Tell the study the trials that finished in `search_dir` but that it was never told (the
    storage was away when their worker stopped), so that a rerun trains none of them again: each
    `trial_result.json` whose trial is still RUNNING is told as it is; one whose trial another worker
    has since failed as stale is told as that trial's re-queued copy, if that is still waiting.
    Their evaluations are reported first. Returns how many were told."""
    trials = study.get_trials(deepcopy=False)
    running = {t.number: t for t in trials if t.state == optuna.trial.TrialState.RUNNING}
    retries = {t.system_attrs["retry_history"][-1]: t for t in trials
               if t.state == optuna.trial.TrialState.WAITING and t.system_attrs.get("retry_history")}
    if not running and not retries:
        return 0
    told = 0
    for path in sorted(glob.glob(os.path.join(search_dir, "trial_*", TRIAL_RESULT_FILE))):
        folder = os.path.dirname(path)
        try:
            row = workdir_lib.read_json(path)
            number = row["number"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if folder != _trial_dir(search_dir, number) or (number not in running and number not in retries):
            continue
        try:
            with lock.hold(folder, create=False):
                frozen = running.get(number)
                if frozen is None:   # claim the waiting copy, as study.ask would
                    frozen = retries[number]
                    if not study._storage.set_trial_state_values(frozen._trial_id, optuna.trial.TrialState.RUNNING):
                        continue
                    study._storage.record_heartbeat(frozen._trial_id)   # so it can go stale if this stops
                trial = optuna.trial.Trial(study, frozen._trial_id)
                for ev in row["evaluations"]:
                    if ev["evaluation"] not in frozen.intermediate_values:
                        trial.report(_objective_value(settings, ev), ev["evaluation"])
                _tell(study, trial, settings, {**row, "run_dir": folder})
        except (lock.RunDirInUse, optuna.exceptions.UpdateFinishedTrialError, ValueError):
            continue   # its worker is still at it, or another worker finished it meanwhile
        told += 1
        result.reported += 1
        copy = f" (the re-queued copy of trial {number})" if frozen.number != number else ""
        print_fn(f"trial {frozen.number}{copy}: {row['status']} (finished before the storage went away; "
                 "reported from its run directory, not trained again)")
    return told


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
