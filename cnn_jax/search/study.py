"""Studies and storages: settings, samplers, pruners, heartbeats, and the budget of trials.

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

- Outages: `open_storage` wraps the storage in `storage.GuardedStorage`, so every later call
  is retried through an outage of up to `--storage_timeout` seconds (see that module).

The worker loop that uses them is `cnn_jax.search.worker`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import optuna

from cnn_jax import config as config_lib
from cnn_jax import model as model_lib
from cnn_jax.data import sources as data_lib
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.config import Config, ConfigError
from cnn_jax.search import space as space_lib
from cnn_jax.search import storage as storage_lib

STUDY_DB = "study.db"
SEARCH_FILE = "search.json"           # the search directory's study name and storage
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
    return data_lib.hold_out(dataset, settings.validation_size or len(dataset.train_labels) // 6)


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


def open_storage(url: str, heartbeat_interval: int, grace_period: int,
                 timeout: float = storage_lib.DEFAULT_TIMEOUT,
                 print_fn: Callable[[str], None] = lambda line: print(line, flush=True)) -> storage_lib.GuardedStorage:
    """The RDB storage at `url`, with heartbeats, every later call of it retried through outages of
    up to `timeout` seconds (`storage.GuardedStorage`); a storage that cannot be opened is a ConfigError."""
    if "://" not in url:
        raise ConfigError(f"--storage={url!r} is not an SQL URL: give e.g. sqlite:///path/study.db or "
                          "postgresql://user:password@host/database (empty: study.db in --workdir)")
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        import sqlalchemy.pool
        # Wait for other workers' writes; a connection per call, so a database file put back after
        # it vanished is the one written to.
        engine_kwargs.update(connect_args={"timeout": max(1.0, min(60.0, timeout))},
                             poolclass=sqlalchemy.pool.NullPool)
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(3):   # workers starting together may race to create the tables: try again
        try:
            with _quiet():
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
                rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                 heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                 heartbeat_stale_trial_callback=retry)
            guard = storage_lib.Guard(_redacted(url), timeout, print_fn, storage_lib.sqlite_check(url))
            return storage_lib.GuardedStorage(optuna.storages._CachedStorage(rdb), guard, grace_period)
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
    """A thread that records a heartbeat every `interval` seconds for each trial in `ids`.

    Its calls defer during a storage outage (`storage.Guard.deferring`): a missed beat is
    simply skipped, and nothing it meets ends the process."""

    def __init__(self, storage: optuna.storages.BaseStorage, interval: float):
        self._storage, self._interval = storage, interval
        self._guard = storage_lib.guard_of(storage)
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
                    with self._guard.deferring():
                        self._storage.record_heartbeat(trial_id)
                except Exception:   # an outage or a busy database: the next beat comes soon
                    break

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- trials and the budget


def trial_config(settings: Settings, params: dict[str, Any]) -> Config:
    return model_lib.validate(config_lib.replace(settings.base, **space_lib.to_config_values(params)))


def fail_stale(study: optuna.Study) -> None:
    """Mark the trials of dead workers failed (and re-queue them: the storage's callback).

    Not within a grace period after a storage outage: nobody's heartbeats got through during it,
    and the live workers' next ones come within the grace period."""
    storage = study._storage
    if storage_lib.guard_of(storage).up_for() < getattr(storage, "grace_period", 0):
        return
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
