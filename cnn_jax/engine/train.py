"""The training loop: `fit` trains one run epoch by epoch; its pieces (the compiled runner, one
epoch of steps, the host-side record of a run) are shared with the vmapped groups of
`cnn_jax.sweep`.

The compiled step and runners are `cnn_jax.engine.step`'s; the state they carry is
`cnn_jax.engine.state.TrainState`. What stays on the host is a `RunLog` per run: the step count, the
tutorial's moving-average loss, this epoch's losses and correct counts, and one record per finished
epoch. Together, a TrainState and a RunLog are everything a run needs to continue exactly where
it stopped (what a checkpoint holds).
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn_jax.engine import compile_cache
from cnn_jax.data import sources as data_lib
from cnn_jax import model
from cnn_jax.engine import evaluation, optim, parallel, state as state_lib, step as step_lib
from cnn_jax.nn import lowering
from cnn_jax.rundir import progress
from cnn_jax.config import Config, ConfigError
from cnn_jax.engine.state import TrainState

Record = dict[str, Any]


def moving_average(values: np.ndarray, smoothing: float, start: float | None = None) -> float:
    """The tutorial's moving-average loss: m <- (1 - s) * m + s * v, starting at the first value."""
    m = start
    for v in np.asarray(values, np.float64):
        m = float(v) if m is None else (1.0 - smoothing) * m + smoothing * float(v)
    return float("nan") if m is None else m


def format_epoch(record: Record) -> str:
    """One line in the tutorial's form, plus time and throughput."""
    return (f"Epoch {record['epoch']}. Loss: {record['moving_loss']:.4g}, "
            f"Train_acc {record['train_accuracy']:.4f}, Test_acc {record['test_accuracy']:.4f}, "
            f"{record['epoch_time']:.1f} s, {record['images_per_second']:.0f} img/s")


def steps_per_epoch(config: Config, num_train: int) -> int:
    """Full batches per epoch (the last partial batch is dropped); ConfigError when there is none."""
    steps = num_train // config.batch_size
    if steps == 0:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than the {num_train} training images")
    return steps


def resolve_loop(config: Config) -> str:
    """The execution strategy: `auto` is a scanned epoch (measured fastest), except one call per
    batch for XLA:CPU's own convolution (`lowering.resolve`, docs/performance.md)."""
    return lowering.resolve(config).loop


@dataclasses.dataclass
class RunLog:
    """A run's host-side record: what `fit` and a sweep group keep per run besides the TrainState."""

    step: int = 0                          # training steps done, over all epochs
    moving_loss: float | None = None       # the tutorial's moving-average loss after `step` steps
    epoch_losses: list[float] = dataclasses.field(default_factory=list)  # this epoch's step losses so far
    epoch_correct: int = 0                 # this epoch's correct training predictions so far
    history: list[Record] = dataclasses.field(default_factory=list)  # one record per finished epoch

    def absorb(self, losses: np.ndarray, correct: np.ndarray, finite: np.ndarray, epoch: int,
               config: Config, images_per_second: float) -> tuple[list[Record], str | None]:
        """Take the metrics of the next steps: (the `{"kind": "train"}` records due every
        `log_every` steps, why the run diverged or None). A non-finite loss, parameter or
        state stops the absorbing at that step."""
        records = []
        for loss, right, ok in zip(np.asarray(losses), np.asarray(correct), np.asarray(finite)):
            if not (ok and np.isfinite(loss)):
                what = (f"loss became {loss}" if not np.isfinite(loss)
                        else "parameters or optimiser state became non-finite")
                return records, f"{what} at step {self.step + 1} (epoch {epoch}); lower --learning_rate"
            self.step += 1
            self.moving_loss = moving_average([loss], config.loss_smoothing, self.moving_loss)
            self.epoch_losses.append(float(loss))
            self.epoch_correct += int(right)
            if self.step % config.log_every == 0:
                window = self.epoch_losses[-config.log_every:]
                records.append({"kind": "train", "step": self.step, "epoch": epoch,
                                "loss": float(np.mean(window)), "moving_loss": self.moving_loss,
                                "images_per_second": images_per_second})
        return records, None

    def running_train_eval(self, num_steps: int, batch_size: int) -> dict[str, float]:
        """This epoch's training loss and accuracy taken during the epoch (`--train_eval=running`)."""
        return {"loss": float(np.mean(np.asarray(self.epoch_losses, np.float32))) if self.epoch_losses
                else float("nan"), "accuracy": self.epoch_correct / (num_steps * batch_size)}

    def finish_epoch(self, epoch: int, train_eval: dict[str, Any], held_out: dict[str, dict[str, Any]],
                     epoch_time: float, images: int) -> Record:
        """The epoch's record (appended to `history`); the epoch's sums start again. `held_out`
        maps each evaluated split ("test", "validation") to its loss and accuracy, the record's
        `{split}_loss` and `{split}_accuracy`."""
        record = {
            "epoch": epoch, "step": self.step, "moving_loss": self.moving_loss,
            "train_loss": float(train_eval["loss"]), "train_accuracy": float(train_eval["accuracy"]),
            **{f"{split}_{key}": float(result[key]) for split, result in held_out.items()
               for key in ("loss", "accuracy")},
            "epoch_time": epoch_time, "images_per_second": images / epoch_time,
        }
        self.history.append(record)
        self.epoch_losses, self.epoch_correct = [], 0
        return record


def host_metrics(step_metrics: list[step_lib.Metrics] | step_lib.Metrics) -> dict[str, np.ndarray]:
    """Metrics of several steps on the host, stacked along a leading step axis (a list of
    per-step metrics or a scan's stacked ones): no per-length compiles."""
    host = jax.device_get(step_metrics)
    if isinstance(host, list):
        host = {key: np.stack([m[key] for m in host]) for key in host[0]}
    return {key: np.asarray(value) for key, value in host.items()}


def run_epoch_steps(runner: Callable, loop: str, state: TrainState, data: tuple, order: jax.Array,
                    first: int, num_steps: int, *, step_offset: int, absorb_every: int, scan_chunk: int,
                    absorb: Callable[[Any], None], bar: Any,
                    should_stop: Callable[[int], bool] = lambda step: False) -> tuple[TrainState, bool]:
    """Steps [first, num_steps) of an epoch through `runner`: (state, whether `should_stop`
    stopped it early). `step` loop: one call per batch, the metrics absorbed every
    `absorb_every` global steps (`step_offset` + index) and at the end; `should_stop(global
    step)` is polled after every step but the last. `scan` loop: calls of `scan_chunk` steps."""
    if loop == "step":
        pending: list[step_lib.Metrics] = []
        for index in range(first, num_steps):
            state, metrics = runner(state, *data, order, np.int32(index))
            pending.append(metrics)
            bar.advance()
            done = step_offset + index + 1
            stop = index < num_steps - 1 and should_stop(done)
            if done % absorb_every == 0 or index == num_steps - 1 or stop:
                absorb(pending)
                pending = []
            if stop:
                return state, True
        return state, False
    for start in range(first, num_steps, scan_chunk):
        count = min(scan_chunk, num_steps - start)
        state, metrics = runner(state, *data, order, np.int32(start), count)
        bar.advance(count)
        absorb(metrics)
    return state, False


def _no_op(*args: Any) -> None:
    del args


@dataclasses.dataclass
class Hooks:
    """What `fit` calls besides training; the defaults do nothing (no workdir).

    on_log(record):             every `log_every` steps, a {"kind": "train", ...} record
    on_epoch(state, log, rec):  after each epoch's evaluation (a workdir saves metrics and a checkpoint)
    should_stop(step):          polled after every step; True makes `fit` call on_stop, then raise Stopped
    on_stop(state, log):        the state to save before stopping (mid-epoch, or right after an epoch)
    """

    on_log: Callable[[Record], None] = _no_op
    on_epoch: Callable[[TrainState, RunLog, Record], None] = _no_op
    should_stop: Callable[[int], bool] = lambda step: False
    on_stop: Callable[[TrainState, RunLog], None] = _no_op


class Stopped(Exception):
    """`fit` stopped early because `Hooks.should_stop` asked it to, after `Hooks.on_stop`."""

    def __init__(self, step: int):
        super().__init__(f"training stopped at step {step}")
        self.step = step


@functools.lru_cache(maxsize=16)
def compiled_runner(config: Config, total_steps: int, loop: str):
    """(optimizer, jitted runner) for a config; cached, so fitting one config again (a resumed
    or repeated run in the same process) reuses the compiled step instead of recompiling it."""
    optimizer = optim.make_optimizer(config, total_steps)
    train_step = parallel.data_parallel(config).wrap_step(step_lib.make_train_step(config, optimizer))
    return optimizer, step_lib.make_runner(config, train_step, loop)


Ahead = tuple[Callable, dict[tuple[int, ...], Callable]]


def compile_ahead(config: Config, dataset: data_lib.Dataset, optimizer: optax.GradientTransformation,
                  runner: Callable, loop: str, num_steps: int) -> Ahead | None:
    """Compile `fit`'s programs for the dataset's shapes, from abstract values: (the training
    runner for whole epochs, called without the static step count; the evaluation batch per
    batch shape, called as `evaluation.evaluate`'s `batch_fn`), or None if compiling failed.

    They go through `compile_cache.load_or_compile`: when a script turned the caches on, a second
    run of the same config loads them whole, without tracing. Run in a thread, the compiles
    overlap drawing the initial params (also mostly compilation, on one core). A failure here
    is left for the real call to report."""
    try:
        state = state_lib.abstract(config, optimizer)
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)   # noqa: E731
        data = (spec(dataset.train_images), spec(dataset.train_labels),
                jax.ShapeDtypeStruct(dataset.train_labels.shape, jnp.int32))
        first = jax.ShapeDtypeStruct((), jnp.int32)
        args = (state, *data, first) + (() if loop == "step" else (num_steps,))
        sources = (model.family(config).__file__,)
        whole_epochs = compile_cache.load_or_compile(runner, args, context=(config, num_steps * config.epochs, loop),
                                                     sources=sources)
        inference = lowering.inference_config(config)
        evals = {}
        for images, labels in ((dataset.train_images, dataset.train_labels),
                               (dataset.test_images, dataset.test_labels)):
            batch = step_lib.abstract_batch(images, labels, config.eval_batch_size)
            if batch[0].shape not in evals:
                evals[batch[0].shape] = compile_cache.load_or_compile(
                    step_lib.eval_batch, (state.params, state.model_state, *batch, inference), context=inference,
                    sources=sources)
        return whole_epochs, evals
    except Exception:  # noqa: BLE001 - the same error surfaces, in context, from the real call
        return None


def whole_epoch_runner(runner: Callable, compiled: Callable, num_steps: int) -> Callable:
    """`runner`, but calls for one step (step loop) or a whole epoch of `num_steps` (scan loop)
    go to `compiled`, its program compiled ahead by `compile_ahead`."""

    def run(state, images, labels, order, first, *count):
        if count in ((), (num_steps,)):
            return compiled(state, images, labels, order, first)
        return runner(state, images, labels, order, first, *count)   # a resumed epoch's remainder

    return run


def fit(config: Config, dataset: data_lib.Dataset, start: tuple[TrainState, RunLog] | None = None,
        hooks: Hooks | None = None) -> tuple[TrainState, list[Record]]:
    """Train on `dataset` from `start` (default: a fresh state); return (final state, history).

    A `start` taken mid-epoch continues that epoch's permutation after the `log.step`
    batches already done, with its moving loss and partial sums, so a resumed run computes
    what an uninterrupted one does. Losses come to the host every `log_every` steps; a
    non-finite loss or parameter raises FloatingPointError naming the step.
    """
    hooks = hooks or Hooks()
    num_steps = steps_per_epoch(config, len(dataset.train_labels))
    loop = resolve_loop(config)
    optimizer, runner = compiled_runner(config, num_steps * config.epochs, loop)
    dp = parallel.data_parallel(config)   # a no-op on one device
    print(f"strategy: {model.strategy(config).describe()}, {dp.describe()}", flush=True)
    compiling, compiled = None, []
    if dp.mesh is None:   # sharded arguments would compile another program
        compiling = threading.Thread(target=lambda: compiled.append(compile_ahead(
            config, dataset, optimizer, runner, loop, num_steps)), daemon=True)
        compiling.start()   # XLA compiles on another core while the params are drawn
    if start is None:
        state, log = state_lib.create(config, optimizer), RunLog()
    else:
        state, log = start
        log = dataclasses.replace(log, epoch_losses=list(log.epoch_losses), history=list(log.history))
    evals: dict[tuple[int, ...], Callable] = {}
    if compiling is not None:
        compiling.join()
        if compiled and compiled[0] is not None:
            whole_epochs, evals = compiled[0]
            runner = whole_epoch_runner(runner, whole_epochs, num_steps)

    def evaluate(state: TrainState, images: jax.Array, labels: jax.Array) -> dict[str, Any]:
        shape = step_lib.abstract_batch(images, labels, config.eval_batch_size)[0].shape
        return evaluation.evaluate(state.params, state.model_state, images, labels, config,
                                   batch_fn=evals.get(shape))
    if config.debug:
        print(model.format_layer_shapes(config), flush=True)

    train_images, train_labels, test_images, test_labels = dp.replicate(
        (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels))
    state = dp.replicate(state)
    for epoch in range(log.step // num_steps, config.epochs):
        first = log.step - epoch * num_steps
        if first == 0:
            log.epoch_losses, log.epoch_correct = [], 0
        order = dp.replicate(data_lib.epoch_permutation(config.seed, epoch, len(dataset.train_labels)))
        bar = progress.epoch_progress(epoch, num_steps, first)
        epoch_start = time.perf_counter()
        last_absorb = [epoch_start]

        def absorb(step_metrics: Any) -> None:
            """Bring losses since the last call to the host: check, accumulate, log."""
            host = host_metrics(step_metrics)
            now = time.perf_counter()
            # The rate of the steps absorbed now, shared by their log lines (a scanned epoch
            # arrives in one piece; one call per batch is absorbed at every log line).
            ips = len(host["loss"]) * config.batch_size / max(now - last_absorb[0], 1e-9)
            last_absorb[0] = now
            records, diverged = log.absorb(host["loss"], host["correct"], host["finite"], epoch, config, ips)
            if diverged:
                raise FloatingPointError(diverged)
            for record in records:
                hooks.on_log(record)
                bar.log(record["step"], record["loss"], ips)

        state, stopped = run_epoch_steps(
            runner, loop, state, (train_images, train_labels), order, first, num_steps,
            step_offset=epoch * num_steps, absorb_every=config.log_every, scan_chunk=num_steps,
            absorb=absorb, bar=bar, should_stop=hooks.should_stop)
        bar.close()
        if stopped:
            hooks.on_stop(state, log)
            raise Stopped(log.step)
        epoch_time = time.perf_counter() - epoch_start
        if config.train_eval == "full":
            train_eval = evaluate(state, train_images, train_labels)
        else:
            train_eval = log.running_train_eval(num_steps, config.batch_size)
        test_eval = evaluate(state, test_images, test_labels)
        record = log.finish_epoch(epoch, train_eval, {"test": test_eval}, epoch_time,
                                  (num_steps - first) * config.batch_size)
        print(format_epoch(record), flush=True)
        hooks.on_epoch(state, log, record)
        if epoch < config.epochs - 1 and hooks.should_stop(log.step):
            hooks.on_stop(state, log)
            raise Stopped(log.step)
    return state, log.history
