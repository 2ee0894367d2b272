"""Studies, storages and the worker loop: ask K trials, train them in vmapped groups, tell the results.

Storage: an Optuna RDB storage. By default an SQLite file inside the search directory
(`study.db`: no server, the same command continues the study); an SQL URL
(`postgresql://user@host/db`) lets workers on many machines share one study. Any number
of workers may run the same command against one storage:

- Budget: `--trials=N` counts the study's trials that are not failed (complete, pruned,
  running or waiting). A worker asks only while fewer than N exist; since two workers
  may ask at once, an asked trial is kept only if fewer than N non-failed trials have
  lower numbers (numbers are given out in order by the storage), else it is told failed
  at once as surplus (never trained). So exactly N trials finish between all workers.
- Heartbeats: Optuna's heartbeat thread only runs inside `study.optimize`; with
  ask-and-tell this module keeps its own (`Heartbeats`): every `heartbeat_interval`
  seconds it records a heartbeat for each trial this worker trains. A worker that dies
  (SIGKILL, a lost machine) stops beating; after `grace_period` seconds any other worker
  (or the same command run again) marks its trials failed and re-queues each one with the
  same parameters (`RetryHeartbeatStaleTrialCallback`), so no trial is silently lost.
- A worker stopped by an error or SIGINT tells its unfinished trials failed and re-queues them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import optuna

from cnn_jax import config as config_lib
from cnn_jax import data as data_lib
from cnn_jax import report, sweep, train
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import Config, ConfigError
from cnn_jax.search import space as space_lib
from cnn_jax.search import trials as trials_lib

STUDY_DB = "study.db"
SEARCH_FILE = "search.json"           # the search directory's study name and storage
TRIAL_RESULT_FILE = "trial_result.json"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "hyperband")
OBJECTIVES = {"validation_accuracy": "maximize", "validation_loss": "minimize",
              "test_accuracy": "maximize", "test_loss": "minimize"}
MAX_RETRY = 2                         # times a trial whose worker died is re-queued
# Base-config fields that may differ between the workers of one study: they change where
# data comes from or how a run executes, not what it computes.
WORKER_FIELDS = workdir_lib.RESUMABLE_FIELDS - {"epochs"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What defines a study: its space, base config and how trials are judged."""

    space: space_lib.Space
    base: Config
    objective: str = "validation_accuracy"
    validation_size: int = 0          # 0: a sixth of the training images
    eval_every: int = 0               # steps between evaluations within an epoch (0: epoch ends only)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a worker to join an existing study."""
        base = {k: v for k, v in config_lib.to_dict(self.base).items()
                if k not in WORKER_FIELDS and k not in self.space}
        return {"space": json.loads(space_lib.to_json(self.space)), "objective": self.objective,
                "validation_size": self.validation_size, "eval_every": self.eval_every, "base_config": base}


# ----------------------------------------------------------------------------- data


def split_validation(dataset: data_lib.Dataset, settings: Settings) -> tuple[data_lib.Dataset, np.ndarray, np.ndarray]:
    """(training data, evaluation images, evaluation labels) of the objective.

    Validation objectives hold out the *last* `validation_size` training images (default: a
    sixth, the last 10,000 of MNIST's 60,000; after `--train_subset`, the last of the subset)
    and train on the rest; test objectives train on every training image and evaluate on the
    test set."""
    if settings.objective.startswith("test_"):
        return dataset, dataset.test_images, dataset.test_labels
    n = len(dataset.train_labels)
    size = settings.validation_size or n // 6
    if not 0 < size < n:
        raise ConfigError(f"--validation_size={size} is not allowed: the validation images are carved from the "
                          f"{n} training images, so give 1..{n - 1}")
    train_part = dataclasses.replace(dataset, train_images=dataset.train_images[:n - size],
                                     train_labels=dataset.train_labels[:n - size])
    return train_part, dataset.train_images[n - size:], dataset.train_labels[n - size:]


# ----------------------------------------------------------------------------- storage and study


def default_storage(search_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(search_dir, STUDY_DB))


def _redacted(url: str) -> str:
    try:
        import sqlalchemy
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


@contextlib.contextmanager
def _quiet():
    """Optuna warns that heartbeats and a few other features are experimental: not news to users."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(url: str, heartbeat_interval: int, grace_period: int) -> optuna.storages.RDBStorage:
    """The RDB storage at `url`, with heartbeats; a storage that cannot be opened is a ConfigError."""
    if "://" not in url:
        raise ConfigError(f"--storage={url!r} is not an SQL URL: give e.g. sqlite:///path/study.db or "
                          "postgresql://user:password@host/database (empty: study.db in --workdir)")
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}   # wait for other workers' writes
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(3):   # workers starting together may race to create the tables: try again
        try:
            with _quiet():
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                  heartbeat_stale_trial_callback=retry)
        except Exception as e:   # sqlalchemy errors, missing drivers, bad URLs
            if attempt < 2 and "already exists" in str(e):
                time.sleep(1.0)
                continue
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise ConfigError(f"--storage={_redacted(url)} cannot be opened ({type(e).__name__}: {first})") from None
    raise AssertionError("unreachable")


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, which stops `study.optimize` once the grid is visited by calling
    `study.stop()` after each trial; with ask-and-tell that raises, and the worker's budget
    (--trials capped at the grid's size) ends the search instead."""

    def after_trial(self, study, trial, state, values) -> None:
        del study, trial, state, values


def make_sampler(name: str, settings: Settings, seed: int) -> optuna.samplers.BaseSampler:
    """tpe (told about running trials: constant_liar, so a batch's trials differ), random, or grid."""
    if name == "tpe":
        with _quiet():
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return _AskTellGridSampler(space_lib.grid(settings.space), seed=seed)
    raise ConfigError(f"--sampler={name!r} is not allowed: use one of {', '.join(SAMPLERS)}")


def grid_size(settings: Settings) -> int:
    return int(np.prod([len(v) for v in space_lib.grid(settings.space).values()]))


def make_pruner(name: str, settings: Settings, evaluations: int) -> optuna.pruners.BasePruner:
    """none; median (stop a trial below the median of earlier trials at the same evaluation);
    hyperband (successive halving over the evaluations, reduction factor 3)."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(evaluations, 1), reduction_factor=3)
    raise ConfigError(f"--pruner={name!r} is not allowed: use one of {', '.join(PRUNERS)}")


def joiner_seed(seed: int) -> int:
    """The sampler seed of a worker that joins an existing study: `seed` mixed with this process's
    id and the time, so that two workers started with the same flags do not propose the same
    trials (TPE's first trials, and the random sampler's, come from the seeded generator alone)."""
    return int(np.random.SeedSequence([seed, os.getpid(), time.time_ns()]).generate_state(1)[0])


def open_study(storage: optuna.storages.BaseStorage, name: str, settings: Settings, sampler: str, seed: int,
               pruner: optuna.pruners.BasePruner, wait_seconds: float = 60.0) -> optuna.Study:
    """Create the study, its sampler seeded with `seed` (so one worker repeats a search), or join
    it with a sampler seeded by `joiner_seed(seed)`; a study of that name with another space,
    objective or base config is a ConfigError."""
    direction = OBJECTIVES[settings.objective]
    fingerprint = json.loads(json.dumps(settings.fingerprint()))
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, pruner=pruner,
                                    sampler=make_sampler(sampler, settings, seed))
        study.set_user_attr("settings", fingerprint)
        return study
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner,
                                  sampler=make_sampler(sampler, settings, joiner_seed(seed)))
    deadline = time.monotonic() + wait_seconds
    while "settings" not in study.user_attrs:   # its creator is about to write them
        if time.monotonic() > deadline:
            raise ConfigError(f"study {name!r} exists but holds no search settings (not made by this tool?); "
                              "choose another --study_name")
        time.sleep(0.2)
    stored = study.user_attrs["settings"]
    for key in ("space", "objective", "validation_size", "eval_every", "base_config"):
        if stored.get(key) != fingerprint[key]:
            what = key
            if key == "base_config":
                fields = sorted(k for k in set(stored[key]) | set(fingerprint[key])
                                if stored[key].get(k) != fingerprint[key].get(k))
                what = f"--{fields[0]} ({stored[key].get(fields[0])!r} there, {fingerprint[key].get(fields[0])!r} here)"
            elif key == "space":
                what = "--space"
            raise ConfigError(f"study {name!r} exists with another {what}: choose another --study_name "
                              "(or --workdir), or give the same settings to continue it")
    return study


def check_search_dir(search_dir: str, study_name: str, storage_url: str) -> None:
    """Refuse a search directory that belongs to another study; record this one's on first use."""
    if os.path.isfile(search_dir):
        raise ConfigError(f"--workdir={search_dir} is a file, not a search directory")
    if workdir_lib.holds_run(search_dir):
        raise ConfigError(f"--workdir={search_dir} holds a training run, not a search; choose another --workdir")
    path = os.path.join(search_dir, SEARCH_FILE)
    mine = {"study_name": study_name, "storage": _redacted(storage_url)}
    if os.path.exists(path):
        theirs = workdir_lib.read_json(path)
        if theirs != mine:
            raise ConfigError(f"--workdir={search_dir} belongs to study {theirs.get('study_name')!r} in "
                              f"{theirs.get('storage')}; choose another --workdir")
        return
    os.makedirs(search_dir, exist_ok=True)
    workdir_lib.write_json(path, mine)


# ----------------------------------------------------------------------------- heartbeats


class Heartbeats:
    """A thread that records a heartbeat every `interval` seconds for each trial in `ids`."""

    def __init__(self, storage: optuna.storages.RDBStorage, interval: float):
        self._storage, self._interval = storage, interval
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="optuna-heartbeats", daemon=True)
        self._thread.start()

    def add(self, trial_id: int) -> None:
        self._storage.record_heartbeat(trial_id)   # at once: a trial without any heartbeat is never stale
        with self._lock:
            self._ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = sorted(self._ids)
            for trial_id in ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception:   # a busy database: the next beat comes soon, well within the grace period
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- the worker


def _trial_dir(search_dir: str, number: int) -> str:
    return os.path.join(search_dir, f"trial_{number:05d}")


def trial_config(settings: Settings, params: dict[str, Any]) -> Config:
    return config_lib.validate(config_lib.replace(settings.base, **space_lib.to_config_values(params)))


def fail_stale(study: optuna.Study) -> None:
    """Mark the trials of dead workers failed (and re-queue them: the storage's callback)."""
    with _quiet():
        optuna.storages.fail_stale_trials(study)


def _active(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state != optuna.trial.TrialState.FAIL


def finished_count(trials: Sequence[optuna.trial.FrozenTrial]) -> int:
    """How many of `trials` finished: complete or pruned (a diverged trial is told pruned)."""
    return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)


def ask_batch(study: optuna.Study, settings: Settings, total: int, batch: int,
              heartbeats: Heartbeats) -> list[optuna.Trial]:
    """Up to `batch` trials within the budget of `total` non-failed trials (see the module
    docstring); surplus trials asked in a race with another worker are told failed at once."""
    trials = study.get_trials(deepcopy=False)
    free = total - sum(map(_active, trials)) + sum(t.state == optuna.trial.TrialState.WAITING for t in trials)
    asked = []
    for _ in range(max(0, min(batch, free))):
        with warnings.catch_warnings():   # "heartbeat is supposed to be used with optimize": we keep it ourselves
            warnings.simplefilter("ignore", UserWarning)
            trial = study.ask(fixed_distributions=settings.space)
        heartbeats.add(trial._trial_id)
        asked.append(trial)
    return drop_surplus(study, asked, total, heartbeats)


def drop_surplus(study: optuna.Study, asked: Sequence[optuna.Trial], total: int,
                 heartbeats: Heartbeats | None = None) -> list[optuna.Trial]:
    """The asked trials that fewer than `total` non-failed trials precede; the others (asked in a
    race with another worker) are told failed, with user attribute outcome=surplus, untrained."""
    if not asked:
        return []
    everything = study.get_trials(deepcopy=False)
    kept = []
    for trial in asked:
        earlier = sum(_active(t) for t in everything if t.number < trial.number)
        if earlier < total:
            kept.append(trial)
        else:
            trial.set_user_attr("outcome", "surplus")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            if heartbeats is not None:
                heartbeats.remove(trial._trial_id)
    return kept


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
            fail_stale(study)
            trials = study.get_trials(deepcopy=False)
            if finished_count(trials) >= total:
                break
            asked = ask_batch(study, settings, total, batch, heartbeats)
            if not asked:
                if not waiting_said:
                    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
                    print_fn(f"waiting for {running} trial(s) that other workers are training "
                             f"({finished_count(trials)}/{total} finished)")
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


def _train_batch(study, settings, search_dir, asked, load_dataset, datasets, heartbeats, max_parallel,
                 result, print_fn) -> None:
    """Train one asked batch: its trials grouped by shape, each group one vmapped program."""
    from cnn_jax import checkpoint, run as run_lib   # orbax is only needed here

    runs = [sweep.Run(f"trial_{t.number:05d}", dict(t.params), trial_config(settings, t.params)) for t in asked]
    by_name = {run.name: trial for run, trial in zip(runs, asked)}
    untold = {t.number for t in asked}
    try:
        for group in sweep.group_runs(runs, max_parallel):
            key = sweep.data_key(group[0].config)
            if key not in datasets:
                datasets[key] = split_validation(load_dataset(group[0].config), settings)
            train_data, val_images, val_labels = datasets[key]
            group_trials = [by_name[r.name] for r in group]
            paths = [_trial_dir(search_dir, t.number) for t in group_trials]
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
                test = None
                if outcome.params is not None:
                    if outcome.status == trials_lib.COMPLETE:
                        test = train.evaluate(outcome.params, train_data.test_images, train_data.test_labels,
                                              run.config, return_predictions=True)
                        confusion = report.confusion_matrix(train_data.test_labels, np.asarray(test["predictions"]),
                                                            train_data.num_classes)
                        test = {"loss": float(test["loss"]), "accuracy": float(test["accuracy"]),
                                "confusion": confusion, "per_class_accuracy": report.per_class_accuracy(confusion)}
                        workdir_lib.write_json(os.path.join(path, workdir_lib.RESULTS_FILE),
                                               report.results_json(test, train_data.class_names, outcome.step))
                        row.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
                    history = [r for r in outcome.records if r["kind"] == "epoch"]
                    state = train.TrainState(outcome.params, outcome.opt_state, step=outcome.step,
                                             moving_loss=outcome.moving_loss, history=history)
                    manager = checkpoint.open_manager(path)
                    try:
                        checkpoint.save(manager, outcome.step, outcome.params, outcome.opt_state,
                                        run_lib.checkpoint_meta(state, run.config,
                                                                train.steps_per_epoch(run.config, len(train_data.train_labels))))
                    finally:
                        manager.close()
                workdir_lib.write_json(os.path.join(path, TRIAL_RESULT_FILE), row)
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
