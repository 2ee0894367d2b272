"""A training run kept in a workdir: config, metrics, checkpoints, plots, results, TensorBoard.

`train_and_evaluate(config, workdir)` trains a config, keeping the run in `workdir` when one is
given (`train_in_workdir`):

1. take the workdir's lock (`cnn_jax.rundir.lock`: a second process on it is refused) and check
   the workdir (only reads: a foreign run is refused unless resume/overwrite);
2. load the data, prepare the run once (`engine.train.prepare`: its program and fresh state)
   and, with `resume`, restore the latest checkpoint into that state (a bad file fails here,
   before anything is written);
3. write config.json, then train with hooks that append metrics, checkpoint after every
   epoch, and on SIGINT/SIGTERM checkpoint the current step and raise `signals.Interrupted`;
4. at the end write results.json and the plots.

A diverging run (non-finite loss or parameter) raises FloatingPointError before any
checkpoint of the bad state is written; the last good checkpoint stays the latest.
A write that fails (disk full, read-only filesystem, workdir deleted) raises
`workdir.WriteError` saying what failed and which checkpoint is kept; the next start
clears what the failed write left.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any, Callable

import jax

from cnn_jax import model
from cnn_jax.config import Config
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import train
from cnn_jax.engine.state import TrainState
from cnn_jax.rundir import checkpoint, lock, plots, progress, report, signals
from cnn_jax.rundir import workdir as workdir_lib


def train_and_evaluate(config: Config, workdir: str | None = None,
                       dataset: data_lib.Dataset | None = None, *, resume: bool = False,
                       overwrite: bool = False, tensorboard: bool = False,
                       print_fn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train for `config.epochs` epochs; return one record per epoch (losses, accuracies, time).

    `dataset` defaults to `data.sources.load(config)`. Nothing is written when `workdir` is None;
    otherwise the run keeps its config, metrics, checkpoints and plots there,
    `resume` continues its latest checkpoint and `overwrite` replaces it.
    """
    if workdir is not None:
        return train_in_workdir(config, workdir, dataset, resume=resume, overwrite=overwrite,
                                tensorboard=tensorboard, print_fn=print_fn)
    if dataset is None:
        dataset = data_lib.load(config)
        print_fn(f"data: {dataset.source}")
    return train.fit(config, dataset, hooks=train.Hooks(progress=progress.epoch_progress, print_fn=print_fn))[1]


def _tensorboard_writer(workdir: str, start_step: int | None):
    from tensorboardX import SummaryWriter
    # purge_step drops events a previous attempt logged after the restored checkpoint.
    return SummaryWriter(os.path.join(workdir, workdir_lib.TENSORBOARD_DIR), purge_step=start_step)


def kept_after_failed_write(workdir: str) -> str:
    """What a run keeps after a write failed: its last complete checkpoint, and how to go on."""
    if not os.path.isdir(workdir):
        return f"{workdir} no longer exists, so nothing of the run is kept"
    try:
        last = checkpoint.latest_step(workdir)
    except Exception:  # noqa: BLE001 - an unreadable checkpoints folder keeps nothing usable
        last = None
    if last is None:
        return "no checkpoint was written yet: free some space and start again with --resume"
    return (f"the last complete checkpoint (step {last}) is kept: free some space (or make {workdir} "
            "writable) and continue with --resume")


def write_failed(workdir: str, error: OSError) -> workdir_lib.WriteError:
    """`error` as one line: what could not be written and what the run keeps."""
    failed = workdir_lib.write_error(error.filename or workdir, error)
    return workdir_lib.WriteError(f"{failed}; {kept_after_failed_write(workdir)}")


def train_in_workdir(config: Config, workdir: str, dataset: data_lib.Dataset | None = None, *,
                     resume: bool = False, overwrite: bool = False, tensorboard: bool = False,
                     print_fn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train `config` keeping everything in `workdir`; return the per-epoch history (all epochs).
    What the run reports (data source, strategy, epoch lines) goes to `print_fn`.

    Nothing is written until the workdir, the data and (with `resume`) the checkpoint are good."""
    workdir_lib.check_target(workdir, resume=resume, overwrite=overwrite)   # before the lock creates it
    # In a multi-host run only process 0 writes files; every process takes part in checkpoints.
    primary = jax.process_index() == 0
    with lock.hold(workdir) if primary else contextlib.nullcontext():
        # Under the lock: a run another process is writing is refused as in use, not as foreign.
        workdir_lib.check(workdir, config, resume=resume, overwrite=overwrite)
        if dataset is None:
            dataset = data_lib.load(config)
            print_fn(f"data: {dataset.source}")
        try:
            session = train.prepare(config, dataset)
            start = checkpoint.restore_state(workdir, session.state, session.steps_per_epoch) if resume else None
            if start is not None:
                workdir_lib.read_metrics(workdir)   # a damaged metrics.jsonl fails here, before anything is written
                step, steps = start[1].step, session.steps_per_epoch
                print_fn(f"resuming {workdir} at step {step} (epoch {step // steps}, step {step % steps}/{steps})")
            if primary:
                workdir_lib.start(workdir, session.config, overwrite=overwrite)
            state, history, records = _fit_keeping(session, start, workdir, tensorboard, primary, print_fn)
            _write_results(session, workdir, state, history, records, primary)
            return history
        except (BrokenPipeError, InterruptedError):
            raise
        except OSError as e:   # checkpoints, metrics, results, plots, TensorBoard events
            raise write_failed(workdir, e) from None


def _fit_keeping(session: train.Session, start: tuple[TrainState, train.RunLog] | None, workdir: str,
                 tensorboard: bool, primary: bool,
                 print_fn: Callable[[str], None]) -> tuple[TrainState, list[dict[str, Any]], list[dict[str, Any]]]:
    """`train.fit_session` keeping the run in `workdir`: metrics and TensorBoard scalars as they come,
    a checkpoint after every epoch and when a signal stops the run; (state, history, metrics records)."""
    start_step = start[1].step if start else None
    metrics = workdir_lib.MetricsLog(workdir, keep_until_step=start_step, write=primary)
    manager = checkpoint.open_manager(workdir)
    writer = _tensorboard_writer(workdir, start_step) if tensorboard and primary else None
    closers = [metrics.flush] + ([writer.close] if writer else []) + [manager.close]
    try:
        state, history = _fit_hooked(session, start, workdir, metrics, manager, writer, print_fn)
    except BaseException:
        for close in closers:   # the error in flight is the one to report
            with contextlib.suppress(Exception):
                close()
        raise
    for close in closers:
        close()
    return state, history, metrics.records


def _fit_hooked(session: train.Session, start: tuple[TrainState, train.RunLog] | None,
                workdir: str, metrics: workdir_lib.MetricsLog, manager: Any, writer: Any,
                print_fn: Callable[[str], None]) -> tuple[TrainState, list[dict[str, Any]]]:
    """The hooks of `_fit_keeping` around `train.fit_session`; a signal or a diverged run raises in one line."""

    def save(state: TrainState, log: train.RunLog) -> None:
        metrics.flush()
        checkpoint.save(manager, state, checkpoint.checkpoint_meta(log, session.config, session.steps_per_epoch))

    def on_log(record: dict[str, Any]) -> None:
        metrics.append(record)
        if writer:
            for name in ("loss", "moving_loss", "images_per_second"):
                writer.add_scalar(f"train/{name}", record[name], record["step"])

    def on_epoch(state: TrainState, log: train.RunLog, record: dict[str, Any]) -> None:
        metrics.append({"kind": "epoch", **record})
        if writer:
            for name in ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "images_per_second"):
                writer.add_scalar(f"epoch/{name}", record[name], record["step"])
            writer.flush()
        save(state, log)

    with signals.stop_on_signals() as stop:
        hooks = train.Hooks(on_log=on_log, on_epoch=on_epoch, should_stop=lambda step: stop.requested,
                            on_stop=save, progress=progress.epoch_progress, print_fn=print_fn)
        try:
            return train.fit_session(session, start, hooks)
        except train.Stopped as e:
            raise signals.Interrupted(stop.signum or signal.SIGINT, e.step,
                                      checkpoint.checkpoint_dir(workdir)) from None
        except FloatingPointError as e:
            last = manager.latest_step()
            kept = (f"the last good checkpoint (step {last}) is kept" if last is not None
                    else "no checkpoint was written")
            raise FloatingPointError(f"{e}; {kept}") from None


def _write_results(session: train.Session, workdir: str, state: TrainState, history: list[dict[str, Any]],
                   records: list[dict[str, Any]], primary: bool) -> None:
    """results.json (the test set evaluated with the weights the run evaluates, by every process)
    and the plots (by process 0)."""
    dataset = session.dataset
    result, = session.program.evaluate(state, dataset.test_images, dataset.test_labels, True)
    result = report.summarize_test(result, dataset)
    if not primary:
        return
    step = history[-1]["step"] if history else 0
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.RESULTS_FILE),
                           report.results_json(result, dataset.class_names, step))
    plots.write_run_plots(os.path.join(workdir, workdir_lib.PLOTS_DIR), session.config, records,
                          model.first_conv(jax.device_get(state.params), session.config),
                          dataset.test_images, dataset.test_labels,
                          result["predictions"], result["confusion"], dataset.class_names)
