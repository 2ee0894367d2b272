"""A training run kept in a workdir: config, metrics, checkpoints, plots, results, TensorBoard.

`train_and_evaluate(config, workdir)` loads the data and trains the config (`engine.train.fit`)
with the hooks that keep the run in `workdir` (`_kept`); without a workdir nothing is written:

1. the workdir is checked before anything else (only reads: a foreign run is refused unless
   resume/overwrite) under its lock (`cnn_jax.rundir.lock`: a second process on it is refused);
2. once the data is loaded and the run prepared, the `start` hook restores the latest checkpoint
   into the run's fresh state (`resume`; a bad file fails here, before anything is written),
   then writes config.json;
3. training appends metrics, checkpoints after every epoch, and on SIGINT/SIGTERM checkpoints
   the current step and raises `signals.Interrupted`;
4. at the end `on_finish` writes results.json and the plots.

A diverging run (non-finite loss or parameter) raises FloatingPointError before any
checkpoint of the bad state is written; the last good checkpoint stays the latest.
A write that fails (disk full, read-only filesystem, workdir deleted) raises
`workdir.WriteError` saying what failed and which checkpoint is kept; the next start
clears what the failed write left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from typing import Any, Callable, Iterator

import jax

from cnn_jax.config import Config
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import train
from cnn_jax.engine.state import TrainState
from cnn_jax.rundir import checkpoint, lock, progress, report, signals
from cnn_jax.rundir import workdir as workdir_lib


def train_and_evaluate(config: Config, workdir: str | None = None,
                       dataset: data_lib.Dataset | None = None, *, resume: bool = False,
                       overwrite: bool = False, tensorboard: bool = False,
                       print_fn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train for `config.epochs` epochs; return one record per epoch (losses, accuracies, time).

    `dataset` defaults to `data.sources.load(config)`. Nothing is written when `workdir` is None;
    otherwise the run keeps its config, metrics, checkpoints and plots there, `resume` continues
    its latest checkpoint and `overwrite` replaces it, and nothing is written until the workdir,
    the data and (with `resume`) the checkpoint are good. What the run reports (data source,
    strategy, epoch lines) goes to `print_fn`."""
    with _kept(config, workdir, resume=resume, overwrite=overwrite, tensorboard=tensorboard,
               print_fn=print_fn) as hooks:
        if dataset is None:
            dataset = data_lib.load(config)
            print_fn(f"data: {dataset.source}")
        return train.fit(config, dataset, hooks=hooks)[1]


@contextlib.contextmanager
def _kept(config: Config, workdir: str | None, *, resume: bool, overwrite: bool, tensorboard: bool,
          print_fn: Callable[[str], None]) -> Iterator[train.Hooks]:
    """The hooks that keep a run of `config` in `workdir` (without one: hooks that only report).

    The workdir is checked, under its lock, before the block runs. `start` restores the latest
    checkpoint into the prepared run's state (`resume`), writes config.json and opens the run's
    files (`_Files`); then metrics and TensorBoard scalars are appended as they come, a checkpoint
    is saved after every epoch and on SIGINT/SIGTERM, and `on_finish` writes results.json and the
    plots. On the way out the files are closed, and a signal, a diverged run or a failed write
    raises in one line (`_one_line`)."""
    reporting = train.Hooks(progress=progress.epoch_progress, print_fn=print_fn)
    if workdir is None:
        yield reporting
        return
    workdir_lib.check_target(workdir, resume=resume, overwrite=overwrite)   # before the lock creates it
    primary = jax.process_index() == 0   # in a multi-host run only process 0 writes files
    files: list[_Files] = []             # opened by `start`, once nothing can fail before writing
    began: list[bool] = []               # set once `start` runs: an OSError from then on is a failed write
    with contextlib.ExitStack() as held:   # the lock, then the signal handlers `start` installs
        if primary:
            held.enter_context(lock.hold(workdir))
        # Under the lock: a run another process writes is refused as in use, not as foreign.
        workdir_lib.check(workdir, config, resume=resume, overwrite=overwrite)

        def start(session: train.Session) -> tuple[TrainState, train.RunLog] | None:
            began.append(True)
            restored = _restore(workdir, session, print_fn) if resume else None
            if primary:
                workdir_lib.start(workdir, config, overwrite=overwrite)
            files.append(_Files.open(workdir, restored[1].step if restored else None, session.steps_per_epoch,
                                     tensorboard, primary, held.enter_context(signals.stop_on_signals())))
            return restored

        def save(state: TrainState, log: train.RunLog) -> None:
            files[0].metrics.flush()
            checkpoint.save(files[0].manager, state, checkpoint.checkpoint_meta(log, config, files[0].steps_per_epoch))

        def on_finish(session: train.Session, state: TrainState, history: list[dict[str, Any]]) -> None:
            dataset = session.dataset
            result, = session.program.evaluate(state, dataset.test_images, dataset.test_labels, True)
            result = report.summarize_test(result, dataset)   # evaluated by every process, written by process 0
            if primary:
                report.write_results(workdir, config, dataset, result, jax.device_get(state.params),
                                     history[-1]["step"] if history else 0, files[0].metrics.records)

        try:
            yield dataclasses.replace(
                reporting, start=start, on_log=lambda record: files[0].append("train", record),
                on_epoch=lambda state, log, record: (files[0].append("epoch", record), save(state, log)),
                should_stop=lambda step: files[0].stop.requested, on_stop=save, on_finish=on_finish)
        except BaseException as e:
            for opened in files:
                opened.close(quietly=True)   # the error in flight is the one to report
            error = _one_line(e, workdir, files, bool(began))
            if error is e:
                raise
            raise error from None
        for opened in files:
            opened.close(quietly=False)


def _restore(workdir: str, session: train.Session,
             print_fn: Callable[[str], None]) -> tuple[TrainState, train.RunLog] | None:
    """The workdir's latest checkpoint restored into the session's fresh state (None when it has
    none); a damaged checkpoint or metrics.jsonl fails here, before anything is written."""
    restored = checkpoint.restore_state(workdir, session.state, session.steps_per_epoch)
    if restored is not None:
        workdir_lib.read_metrics(workdir)
        step, steps = restored[1].step, session.steps_per_epoch
        print_fn(f"resuming {workdir} at step {step} (epoch {step // steps}, step {step % steps}/{steps})")
    return restored


_SCALARS = {"train": ("loss", "moving_loss", "images_per_second"),
            "epoch": ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "images_per_second")}


@dataclasses.dataclass
class _Files:
    """What a kept run writes as it trains: metrics.jsonl, its checkpoints, TensorBoard events
    (process 0 only), and the stop request its signal handlers set."""

    metrics: workdir_lib.MetricsLog
    manager: Any
    writer: Any
    steps_per_epoch: int
    stop: signals.StopRequest

    @classmethod
    def open(cls, workdir: str, start_step: int | None, steps_per_epoch: int, tensorboard: bool,
             primary: bool, stop: signals.StopRequest) -> _Files:
        """The files of a run (re)starting after `start_step` (None: from the beginning)."""
        metrics = workdir_lib.MetricsLog(workdir, keep_until_step=start_step, write=primary)
        manager = checkpoint.open_manager(workdir)
        writer = _tensorboard_writer(workdir, start_step) if tensorboard and primary else None
        return cls(metrics, manager, writer, steps_per_epoch, stop)

    def append(self, kind: str, record: dict[str, Any]) -> None:
        """A "train" or "epoch" record into metrics.jsonl and its scalars into TensorBoard."""
        self.metrics.append(record if kind == "train" else {"kind": kind, **record})
        if self.writer:
            for name in _SCALARS[kind]:
                self.writer.add_scalar(f"{kind}/{name}", record[name], record["step"])
            if kind == "epoch":
                self.writer.flush()

    def close(self, quietly: bool) -> None:
        """Flush the metrics, close the TensorBoard writer and the checkpoint manager; `quietly`
        while another error is on its way out."""
        for close in [self.metrics.flush] + ([self.writer.close] if self.writer else []) + [self.manager.close]:
            if quietly:
                with contextlib.suppress(Exception):
                    close()
            else:
                close()


def _one_line(error: BaseException, workdir: str, files: list[_Files], began: bool) -> BaseException:
    """The error a kept run reports for `error`: a stop request as `signals.Interrupted`, a
    diverged run with the checkpoint it keeps, an OSError once the run began writing as a failed
    write (`write_failed`); anything else as it is."""
    if isinstance(error, train.Stopped) and files:
        return signals.Interrupted(files[0].stop.signum or signal.SIGINT, error.step,
                                   checkpoint.checkpoint_dir(workdir))
    if isinstance(error, FloatingPointError) and files:
        last = files[0].manager.latest_step()
        kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written"
        return FloatingPointError(f"{error}; {kept}")
    if isinstance(error, OSError) and not isinstance(error, (BrokenPipeError, InterruptedError)) and began:
        return write_failed(workdir, error)
    return error


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
