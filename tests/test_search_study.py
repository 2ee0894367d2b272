"""cnn_jax.search.study and .storage: the validation split, studies and their settings, the budget of
trials, and storage calls retried through outages."""

import sqlite3

import numpy as np
import optuna
import pytest

from cnn_jax import config as config_lib
from cnn_jax.data import sources as data
from cnn_jax.config import ConfigError
from cnn_jax.search import space as space_lib
from cnn_jax.search import storage as storage_lib
from cnn_jax.search import study as study_lib


# ----------------------------------------------------------------------------- in-process


def test_validation_is_the_last_training_images_and_test_objectives_use_the_test_set(mnist):
    small = data.from_arrays("mnist", (mnist.train_images[:120] * 255).astype(np.uint8), mnist.train_labels[:120],
                             (mnist.test_images[:30] * 255).astype(np.uint8), mnist.test_labels[:30],
                             mnist.class_names)
    settings = study_lib.Settings(space_lib.parse("learning_rate=uniform(0.01,0.1)"), config_lib.Config())
    train, val_x, val_y = study_lib.split_validation(small, settings)
    assert len(train.train_labels) == 100 and len(val_y) == 20          # a sixth by default
    np.testing.assert_array_equal(val_x, small.train_images[100:])
    np.testing.assert_array_equal(val_y, small.train_labels[100:])
    train, val_x, val_y = study_lib.split_validation(small, study_lib.Settings(settings.space, settings.base,
                                                                               validation_size=30))
    assert len(train.train_labels) == 90 and len(val_y) == 30
    train, val_x, val_y = study_lib.split_validation(small, study_lib.Settings(settings.space, settings.base,
                                                                               objective="test_accuracy"))
    assert len(train.train_labels) == 120 and val_x is small.test_images
    with pytest.raises(ConfigError, match="--validation_size=120 is not allowed"):
        study_lib.split_validation(small, study_lib.Settings(settings.space, settings.base, validation_size=120))


def test_a_study_of_that_name_with_another_space_or_base_config_is_refused(tmp_path):
    storage = study_lib.open_storage(study_lib.default_storage(str(tmp_path)), 1, 3)
    a = study_lib.Settings(space_lib.parse("learning_rate=loguniform(1e-3,1e-1)"), config_lib.Config())
    sampler, pruner = "random", optuna.pruners.NopPruner()
    study_lib.open_study(storage, "s", a, sampler, 0, pruner)
    study_lib.open_study(storage, "s", a, sampler, 0, pruner)        # the same settings join it
    b = study_lib.Settings(space_lib.parse("learning_rate=loguniform(1e-3,1e-2)"), config_lib.Config())
    with pytest.raises(ConfigError, match="study 's' exists with another --space"):
        study_lib.open_study(storage, "s", b, sampler, 0, pruner)
    c = study_lib.Settings(a.space, config_lib.Config(num_fc=64))
    with pytest.raises(ConfigError, match=r"exists with another --num_fc \(128 there, 64 here\)"):
        study_lib.open_study(storage, "s", c, sampler, 0, pruner)
    # How a worker runs (data_dir, loop, ...) may differ between workers.
    study_lib.open_study(storage, "s", study_lib.Settings(a.space, config_lib.Config(data_dir="/elsewhere")),
                         sampler, 0, pruner)


def test_the_budget_counts_every_worker_and_surplus_trials_are_failed_untrained(tmp_path):
    storage = study_lib.open_storage(study_lib.default_storage(str(tmp_path)), 1, 3)
    settings = study_lib.Settings(space_lib.parse("learning_rate=loguniform(1e-3,1e-1)"), config_lib.Config())
    one = study_lib.open_study(storage, "s", settings, "random", 0, optuna.pruners.NopPruner())
    two = study_lib.open_study(storage, "s", settings, "random", 0, optuna.pruners.NopPruner())
    beats = study_lib.Heartbeats(storage, 1)
    try:
        first = study_lib.ask_batch(one, settings, 3, 2, beats)
        second = study_lib.ask_batch(two, settings, 3, 2, beats)     # only one left
        assert [len(first), len(second)] == [2, 1]
        # A worker that joins with the same --seed does not repeat the first worker's proposals.
        assert second[0].params not in [t.params for t in first]
        assert study_lib.ask_batch(one, settings, 3, 2, beats) == []
        # A worker that asked at the same time as another gets a trial numbered past the budget:
        # it is failed as surplus, untrained, while those within the budget are kept.
        with pytest.warns(UserWarning, match="Heartbeat"):   # Optuna's note on heartbeats with ask
            racing = two.ask()
        assert study_lib.drop_surplus(two, [racing], 3) == []
        assert one.trials[racing.number].state == optuna.trial.TrialState.FAIL
        assert one.trials[racing.number].user_attrs == {"outcome": "surplus"}
        assert study_lib.drop_surplus(one, first, 3) == first
        # A failed trial frees its place.
        one.tell(first[0], state=optuna.trial.TrialState.FAIL)
        assert len(study_lib.ask_batch(one, settings, 3, 2, beats)) == 1
    finally:
        beats.close()


# ----------------------------------------------------------------------------- storage outages


class _Clock:
    """A fake clock whose sleep advances it: retries and backoff without waiting."""

    def __init__(self):
        self.now, self.sleeps = 100.0, []

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def _refused():
    import sqlalchemy.exc
    refused = ConnectionRefusedError("connection refused")
    try:   # as SQLAlchemy raises the driver's error
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, refused) from refused
    except sqlalchemy.exc.OperationalError as cause:
        try:   # as Optuna's RDBStorage reports it
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from cause
        except optuna.exceptions.StorageInternalError as e:
            return e


def _flaky(failures, result="ok"):
    """A storage call that fails with a refused connection `failures` times, then returns `result`."""
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= failures:
            raise _refused()
        return result
    return call, calls


def test_connection_errors_are_told_from_other_storage_errors():
    assert storage_lib.is_connection_error(_refused())
    assert storage_lib.describe(_refused()) == "ConnectionRefusedError: connection refused"
    assert storage_lib.is_connection_error(FileNotFoundError("the database file x is missing"))
    assert not storage_lib.is_connection_error(optuna.exceptions.UpdateFinishedTrialError("finished"))
    assert not storage_lib.is_connection_error(ValueError("Cannot tell a FAIL trial."))
    assert [storage_lib.backoff(i) for i in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]


def test_a_short_outage_is_retried_with_backoff_and_said_once():
    clock, lines = _Clock(), []
    guard = storage_lib.Guard("postgresql://u:***@db/x", 60, lines.append, clock=clock, sleep=clock.sleep)
    call, calls = _flaky(4)
    assert guard.call(call) == "ok" and len(calls) == 5
    assert clock.sleeps == [0.5, 1, 2, 4]
    assert lines == ["storage postgresql://u:***@db/x is unreachable (ConnectionRefusedError: connection refused); "
                     "retrying for up to 60 s (--storage_timeout); trials keep training, their results are told "
                     "when it is back", "storage postgresql://u:***@db/x is reachable again after 8 s"]
    assert guard.outages == 1 and guard.up_for() == 0
    # Other errors pass at once, untried again and unsaid.
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        guard.call(lambda: (_ for _ in ()).throw(optuna.exceptions.UpdateFinishedTrialError("x")))
    assert len(lines) == 2


def test_a_long_outage_ends_in_one_line_and_deferring_calls_never_wait():
    clock, lines = _Clock(), []
    guard = storage_lib.Guard("sqlite:///s/study.db", 20, lines.append, clock=clock, sleep=clock.sleep)
    call, calls = _flaky(10**6)
    with guard.deferring():   # while trials train: raise at once, try again only after the backoff
        with pytest.raises(storage_lib.StorageDown):
            guard.call(call)
        with pytest.raises(storage_lib.StorageDown):
            guard.call(call)
    assert len(calls) == 1 and clock.sleeps == []
    clock.now += 0.5
    with pytest.raises(storage_lib.StorageDown), guard.deferring():
        guard.call(call)
    assert len(calls) == 2
    with pytest.raises(storage_lib.StorageUnavailable) as error:
        guard.call(call)
    assert sum(clock.sleeps) == pytest.approx(19.5)   # 20 s in all since the outage began
    assert str(error.value) == (
        "storage sqlite:///s/study.db unreachable for 20 s, longer than --storage_timeout=20 "
        "(ConnectionRefusedError: connection refused); the finished trials it was not told are kept in their "
        "run directories: once it is back, run the same command again to report them and continue the search")
    assert len(lines) == 1


def test_a_tell_whose_commit_landed_before_the_connection_dropped_is_not_told_twice(tmp_path):
    storage = study_lib.open_storage(study_lib.default_storage(str(tmp_path)), 1, 3, timeout=10,
                                     print_fn=lambda line: None)
    settings = study_lib.Settings(space_lib.parse("learning_rate=loguniform(1e-3,1e-1)"), config_lib.Config())
    study = study_lib.open_study(storage, "s", settings, "random", 0, optuna.pruners.NopPruner())
    with pytest.warns(UserWarning, match="Heartbeat"):
        trial = study.ask()
    inner, lost = storage.inner, []

    class DropsAfterCommit:   # the first write commits, then its answer is lost
        def __getattr__(self, name):
            return getattr(inner, name)

        def set_trial_state_values(self, *args, **kwargs):
            done = inner.set_trial_state_values(*args, **kwargs)
            if not lost:
                lost.append(1)
                raise _refused()
            return done

    storage.inner = DropsAfterCommit()
    study.tell(trial, 0.5)
    assert lost and study.trials[0].state == optuna.trial.TrialState.COMPLETE and study.trials[0].value == 0.5


def test_a_vanished_or_locked_sqlite_file_is_an_outage(tmp_path):
    lines = []
    storage = study_lib.open_storage(study_lib.default_storage(str(tmp_path)), 1, 3, timeout=1,
                                     print_fn=lines.append)
    settings = study_lib.Settings(space_lib.parse("learning_rate=loguniform(1e-3,1e-1)"), config_lib.Config())
    study = study_lib.open_study(storage, "s", settings, "random", 0, optuna.pruners.NopPruner())
    db = tmp_path / study_lib.STUDY_DB
    db.rename(tmp_path / "away.db")
    with pytest.raises(storage_lib.StorageDown), storage.guard.deferring():
        study.get_trials()
    with pytest.raises(storage_lib.StorageUnavailable, match=r"FileNotFoundError: the database file .* is missing"):
        study.get_trials()
    assert not db.exists()   # SQLite was never let to make an empty one there
    (tmp_path / "away.db").rename(db)
    assert study.get_trials() == [] and len(lines) == 2 and "reachable again" in lines[1]
    # Locked by another process for longer than the timeout (SQLite waits up to the timeout itself).
    holder = sqlite3.connect(str(db))
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(storage_lib.StorageUnavailable, match="OperationalError: database is locked"):
            study.set_user_attr("x", 1)
    finally:
        holder.rollback()
        holder.close()
    study.set_user_attr("x", 1)
    assert study.user_attrs["x"] == 1 and len(lines) == 4
