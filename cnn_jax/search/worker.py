"""The worker loop: ask K trials, train them in vmapped groups, tell the results; keep run directories.

`run_worker` repeats, until the study has `--trials` finished trials (across all workers):
mark dead workers' trials failed (re-queued by the storage's callback), ask a batch within
the budget (`study.ask_batch`), group it by shape (`sweep.group_runs`), train each group
with `trials.train_trials`, reporting every evaluation to Optuna and dropping the trials its
pruner stops, and tell each trial's outcome as soon as it has one. With nothing to ask it
waits while other workers' trials run. A worker stopped by an error or SIGINT tells its
unfinished trials failed and re-queues them with the same parameters.

Each trial keeps a run directory `trial_NNNNN` in the search directory of the machine that
trained it, in the layout of `experiments/train.py --workdir` plus `trial_result.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from typing import Any, Callable

import numpy as np
import optuna

from cnn_jax.data import sources as data_lib
from cnn_jax import sweep
from cnn_jax.engine import evaluation, train
from cnn_jax.rundir import lock, report
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.config import Config
from cnn_jax.search import space as space_lib
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
    waiting_said = False
    try:
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
            _train_batch(study, settings, search_dir, asked, load_dataset, datasets, heartbeats,
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
    from cnn_jax import run as run_lib  # orbax is only needed here
    from cnn_jax.rundir import checkpoint

    test = None
    if outcome.params is not None:
        if outcome.status == trials_lib.COMPLETE:
            result = evaluation.evaluate(outcome.state.params, outcome.state.model_state, dataset.test_images,
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
            checkpoint.save(manager, outcome.state, run_lib.checkpoint_meta(outcome.log, config, steps_per_epoch))
        finally:
            manager.close()
    workdir_lib.write_json(os.path.join(path, TRIAL_RESULT_FILE), row)
    return test


def _train_batch(study, settings, search_dir, asked, load_dataset, datasets, heartbeats, max_parallel,
                 result, print_fn) -> None:
    """Train one asked batch: its trials grouped by shape, each group one vmapped program."""
    runs = [sweep.Run(f"trial_{t.number:05d}", dict(t.params), study_lib.trial_config(settings, t.params)) for t in asked]
    by_name = {run.name: trial for run, trial in zip(runs, asked)}
    untold = {t.number for t in asked}
    try:
        for group in sweep.group_runs(runs, max_parallel):
            key = sweep.data_key(group[0].config)
            if key not in datasets:
                datasets[key] = study_lib.split_validation(load_dataset(group[0].config), settings)
            train_data, val_images, val_labels = datasets[key]
            group_trials = [by_name[r.name] for r in group]
            paths = [_trial_dir(search_dir, t.number) for t in group_trials]
            with contextlib.ExitStack() as locks:   # one writer per trial directory
                for path in paths:
                    locks.enter_context(lock.hold(path))
                for path, r in zip(paths, group):
                    workdir_lib.start(path, r.config, overwrite=True)
                logs = [workdir_lib.MetricsLog(path) for path in paths]
                abandoned: set[int] = set()
                print_fn(f"training trial(s) {', '.join(str(t.number) for t in group_trials)} together: "
                         + "  ".join(f"#{t.number} " + space_lib.describe_params(t.params) for t in group_trials))

                def decide(members: list[int], evaluations: list[dict[str, Any]]) -> list[bool]:
                    stop = []
                    for i, ev in zip(members, evaluations):
                        trial = group_trials[i]
                        try:
                            trial.report(_objective_value(settings, ev), ev["evaluation"])
                            stop.append(trial.should_prune())
                        except optuna.exceptions.UpdateFinishedTrialError:
                            abandoned.add(i)   # failed as stale by another worker, who re-queued it
                            stop.append(True)
                    return stop

                def on_stop(i: int, outcome: trials_lib.TrialResult) -> None:
                    trial, run, path = group_trials[i], group[i], paths[i]
                    logs[i].flush()
                    row = {"number": trial.number, "params": trial.params, "status": outcome.status,
                           "message": outcome.message, "step": outcome.step, "evaluations": outcome.evaluations,
                           "seconds": outcome.seconds, "group_size": len(group), "worker": _worker()}
                    test = save_trial(path, run.config, outcome, train_data, row)
                    untold.discard(trial.number)
                    heartbeats.remove(trial._trial_id)
                    if i in abandoned:
                        result.lost += 1
                        print_fn(f"trial {trial.number}: another worker marked it failed (no heartbeat within the "
                                 "grace period) and re-queued it; dropped here")
                        return
                    try:
                        for key, value in (("outcome", outcome.status), ("run_dir", os.path.abspath(path)),
                                           ("worker", row["worker"]), ("seconds", outcome.seconds),
                                           ("group_size", len(group))):
                            trial.set_user_attr(key, value)
                        if test is not None:
                            trial.set_user_attr("test_accuracy", test["accuracy"])
                            trial.set_user_attr("test_loss", test["loss"])
                        if outcome.status == trials_lib.COMPLETE:
                            study.tell(trial, _objective_value(settings, outcome.evaluations[-1]))
                        else:   # pruned, or diverged: worse than any trial that finished
                            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        result.lost += 1
                        return
                    result.trained += 1
                    setattr(result, outcome.status, getattr(result, outcome.status) + 1)
                    last = outcome.evaluations[-1] if outcome.evaluations else None
                    shown = f"{settings.objective}={_objective_value(settings, last):.4f}" if last else ""
                    print_fn(f"trial {trial.number}: {outcome.status} at step {outcome.step} {shown}"
                             + (f" ({outcome.message})" if outcome.message else ""))

                def on_record(i: int, record: dict[str, Any]) -> None:
                    logs[i].append(record)

                trials_lib.train_trials([r.config for r in group], train_data, val_images, val_labels,
                                        settings.eval_every, decide, on_record, on_stop)
    except BaseException:
        # SIGINT or an error: nothing asked may be lost; re-queue what was not told.
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


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
