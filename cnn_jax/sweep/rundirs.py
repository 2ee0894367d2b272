"""The run directories of a sweep: one per run, in the format of `experiments/train.py --workdir`,
plus `sweep_result.json`, written last, which marks the run finished."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np


from cnn_jax.config import ConfigError
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import train
from cnn_jax.rundir import checkpoint, lock, readers, report
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.sweep.group import train_group
from cnn_jax.sweep.spec import Run, coerce_value

SWEEP_RESULT_FILE = "sweep_result.json"
# A run's final metrics in its row; the validation ones are null unless the sweep holds out a
# validation split (`--validation_size`).
VALIDATION_FIELDS = ("validation_loss", "validation_accuracy")
METRIC_FIELDS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", *VALIDATION_FIELDS, "moving_loss")


def run_dir(sweep_dir: str, run: Run) -> str:
    return os.path.join(sweep_dir, run.name)


def is_finished(path: str) -> bool:
    return os.path.exists(os.path.join(path, SWEEP_RESULT_FILE))


# Fields that do not change what a run computes: a finished run counts as done whatever they are.
IGNORED_WHEN_RESUMING = workdir_lib.RESUMABLE_FIELDS - {"epochs", "train_eval"}


def pending_runs(sweep_dir: str, runs: Sequence[Run], validation_size: int = 0) -> tuple[list[Run], list[Run]]:
    """(runs still to train, runs already finished); refuses (ConfigError, before anything is
    written) a run directory that holds a run with another config, a finished run that held out
    another `validation_size` (it trained on other images), or a damaged sweep_result.json."""
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
        if is_finished(path):   # a damaged result fails before anything trains
            held_out = read_row(os.path.join(path, SWEEP_RESULT_FILE))["validation_size"]
            if held_out != validation_size:
                raise ConfigError(f"{path} was trained with --validation_size={held_out}, not {validation_size}; "
                                  "give the same --validation_size, or use another --workdir")
        (done if is_finished(path) else todo).append(run)
    return todo, done


def result_row(run: Run, history: list[dict[str, Any]], status: str, message: str,
               seconds: float, group_size: int, validation_size: int = 0) -> dict[str, Any]:
    """The run's line of the results table (what sweep_result.json holds); `validation_size`:
    the training images held out for validation (0: none)."""
    last = history[-1] if history else {}
    return {
        "name": run.name, "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                       for k, v in run.settings.items()},
        "status": status, "message": message, "epochs": len(history),
        **{k: last.get(k) for k in METRIC_FIELDS},
        "time_s": seconds, "group_size": group_size, "validation_size": validation_size,
    }


def run_group(sweep_dir: str, runs: Sequence[Run], dataset: data_lib.Dataset,
              print_fn: Callable[[str], None] = print,
              validation: tuple[Any, Any] | None = None,
              programs: dict[tuple, Any] | None = None) -> list[dict[str, Any]]:
    """Train one group and keep each run in its directory; return the runs' result rows.
    With `validation` (images and labels held out of `dataset`'s training images), the rows
    also hold the final validation loss and accuracy. `programs` (one dict for the whole sweep)
    reuses the programs compiled for earlier groups (`engine.program.build`).

    Each run directory is locked for the group's whole training (`cnn_jax.rundir.lock`: another
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
            return _run_group_locked(runs, paths, dataset, print_fn, validation, programs)
        except (BrokenPipeError, InterruptedError):
            raise
        except OSError as e:
            failed = workdir_lib.write_error(e.filename or sweep_dir, e)
            raise workdir_lib.WriteError(f"{failed}; the runs finished before are kept: make room (or make "
                                         f"{sweep_dir} writable) and run the command again to train the "
                                         "rest") from None


def _run_group_locked(runs: Sequence[Run], paths: list[str], dataset: data_lib.Dataset,
                      print_fn: Callable[[str], None], validation: tuple[Any, Any] | None,
                      programs: dict[tuple, Any] | None) -> list[dict[str, Any]]:
    for path, r in zip(paths, runs):
        workdir_lib.start(path, r.config, overwrite=True)
    logs = [workdir_lib.MetricsLog(path) for path in paths]

    def on_log(i: int, record: dict[str, Any]) -> None:
        logs[i].append(record)

    def on_epoch(i: int, record: dict[str, Any]) -> None:
        logs[i].append({"kind": "epoch", **record})
        logs[i].flush()
        print_fn(f"{runs[i].name}: {train.format_epoch(record)}")

    result = train_group([r.config for r in runs], dataset, on_log, on_epoch, validation, programs=programs)
    rows = []
    for i, (path, r) in enumerate(zip(paths, runs)):
        logs[i].flush()
        history = result.histories[i]
        if result.diverged[i]:
            status, message = "diverged", result.diverged[i]
            print_fn(f"{r.name}: diverged: {message}")
        else:
            status, message = "ok", ""
            test = {"loss": float(result.tests[i]["loss"]), "accuracy": float(result.tests[i]["accuracy"])}
            confusion = report.confusion_matrix(dataset.test_labels, np.asarray(result.tests[i]["predictions"]),
                                                dataset.num_classes)
            test.update(confusion=confusion, per_class_accuracy=report.per_class_accuracy(confusion))
            workdir_lib.write_json(os.path.join(path, workdir_lib.RESULTS_FILE),
                                   report.results_json(test, dataset.class_names, history[-1]["step"]))
            manager = checkpoint.open_manager(path)
            try:
                checkpoint.save(manager, jax.device_get(result.states[i]),
                                checkpoint.checkpoint_meta(result.logs[i], r.config, result.steps_per_epoch))
            finally:
                manager.close()
        row = result_row(r, history, status, message, result.seconds, len(runs),
                         0 if validation is None else len(validation[1]))
        workdir_lib.write_json(os.path.join(path, SWEEP_RESULT_FILE), row)
        rows.append(row)
    return rows


# The fields of sweep_result.json that the tables and the plot read (`result_row` writes them).
ROW_FIELDS = {"name": readers.TEXT, "settings": readers.OBJECT, "status": readers.one_of("ok", "diverged"),
              "message": readers.TEXT, "epochs": readers.COUNT, "time_s": readers.NUMBER,
              "group_size": readers.POSITIVE, "validation_size": readers.COUNT,
              **{k: readers.NUMBER_OR_NULL for k in METRIC_FIELDS}}
# A finished run ("ok") has its final metrics.
OK_ROW_FIELDS = {k: readers.NUMBER for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")}


def read_row(path: str) -> dict[str, Any]:
    """A run's sweep_result.json, checked: the fields of `ROW_FIELDS`, settings that are config
    values (normalised to their types, lists for list-valued flags)."""
    fix = (f"delete it: the run then counts as unfinished and running the sweep again trains it "
           f"(or delete its folder {os.path.dirname(path)})")
    row = readers.check_object(workdir_lib.read_json(path, fix), path, fix)
    # Rows written before sweeps could hold out a validation split have no validation fields.
    row = {"validation_size": 0, **{k: None for k in VALIDATION_FIELDS}, **row}
    row = readers.check_fields(row, ROW_FIELDS, path, fix)
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
