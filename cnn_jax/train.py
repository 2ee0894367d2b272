"""Training: a pure, jit-compiled train step, batched evaluation, `train_and_evaluate`.

The whole dataset is put on the device once; a training step receives the
epoch's permutation and its step number and gathers its batch inside the
compiled program, so the hot path makes no per-batch host copies.
Two execution strategies share the same step: `step` (one jitted call per
batch) and `scan` (a whole epoch inside one `lax.scan`).
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

from cnn_jax import data as data_lib
from cnn_jax import layers, lowering, model, optim, parallel, progress
from cnn_jax.config import Config, ConfigError

Metrics = dict[str, jax.Array]
StepFn = Callable[[model.Params, Any, jax.Array, jax.Array], tuple[model.Params, Any, Metrics]]


def loss_fn(params: model.Params, images: jax.Array, labels: jax.Array,
            config: Config) -> tuple[jax.Array, Metrics]:
    """The training objective (per-example cross-entropy, summed or averaged) and batch metrics."""
    logits = model.apply(params, images, config)
    losses = layers.softmax_cross_entropy(logits, labels)
    loss = losses.sum() if config.loss_reduction == "sum" else losses.mean()
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    return loss, {"loss": losses.mean(), "correct": correct}


def make_train_step(config: Config, optimizer: optax.GradientTransformation) -> StepFn:
    """A pure step: (params, opt_state, images, labels) -> (params, opt_state, metrics)."""

    def train_step(params, opt_state, images, labels):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, images, labels, config)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
        # Divergence check: NaN can hide from the loss (relu/max drop it), never from the params;
        # an overflowing optimiser state (Adam's squared gradients) leaves the params finite but can
        # never be checkpointed, so it counts too.
        metrics["finite"] = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, opt_state))
                                               if jnp.issubdtype(x.dtype, jnp.inexact)]))
        return params, opt_state, metrics

    return train_step


def _gather_batch(images, labels, order, step, batch_size):
    """Batch `step` of `order`; a stacked order (runs, n) gives one batch per run (cnn_jax.sweep)."""
    idx = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size, axis=-1)
    return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0)


def make_step_runner(config: Config, train_step: StepFn):
    """Jitted one-batch runner: (params, opt_state, images, labels, order, step) -> ...; donates state."""

    @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=lowering.compiler_options(config))
    def run(params, opt_state, images, labels, order, step):
        batch = _gather_batch(images, labels, order, step, config.batch_size)
        return train_step(params, opt_state, *batch)

    return run


def make_scan_runner(config: Config, train_step: StepFn):
    """Jitted runner of steps [first, first + num_steps) of an epoch inside one `lax.scan`."""

    @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnums=(6,),
                       compiler_options=lowering.compiler_options(config))
    def run(params, opt_state, images, labels, order, first, num_steps):
        def body(state, step):
            batch = _gather_batch(images, labels, order, step, config.batch_size)
            params, opt_state, metrics = train_step(*state, *batch)
            return (params, opt_state), metrics

        (params, opt_state), metrics = jax.lax.scan(
            body, (params, opt_state), first + jnp.arange(num_steps))
        return params, opt_state, metrics

    return run


def resolve_loop(config: Config) -> str:
    """The execution strategy: `auto` is a scanned epoch on every backend (measured fastest on
    CPU too: `lowering.resolve`, WORKSPACE.md "Performance")."""
    return lowering.resolve(config).loop


@functools.partial(jax.jit, static_argnums=(4,))
def _eval_batch(params, images, labels, mask, config):
    logits = model.apply(params, images, config)
    losses = layers.softmax_cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels)
    return jnp.sum(losses * mask), jnp.sum(correct * mask), logits


def eval_batches(images: jax.Array, labels: jax.Array, batch_size: int):
    """Yield (images, labels, mask, real) batches of one shape; the last is zero-padded and masked."""
    n = len(labels)
    bs = min(batch_size, n)
    for start in range(0, n, bs):
        x, y = images[start:start + bs], labels[start:start + bs]
        real = len(y)
        mask = jnp.arange(bs) < real
        if real < bs:
            x = jnp.concatenate([x, jnp.zeros((bs - real,) + x.shape[1:], x.dtype)])
            y = jnp.concatenate([y, jnp.zeros((bs - real,), y.dtype)])
        yield x, y, mask, real


def evaluate(params: model.Params, images: jax.Array, labels: jax.Array, config: Config,
             return_predictions: bool = False) -> dict[str, Any]:
    """Mean loss and accuracy over (images, labels), in batches of `config.eval_batch_size`.

    The last batch is padded and masked, so every batch has one shape (one compile).
    """
    n = len(labels)
    loss_sum, correct_sum, predictions = 0.0, 0, []
    for x, y, mask, real in eval_batches(images, labels, config.eval_batch_size):
        batch_loss, batch_correct, logits = _eval_batch(params, x, y, mask,
                                                        lowering.inference_config(config))
        loss_sum += batch_loss
        correct_sum += batch_correct
        if return_predictions:
            predictions.append(jnp.argmax(logits[:real], axis=-1))
    result = {"loss": float(loss_sum) / n, "accuracy": float(correct_sum) / n}
    if return_predictions:
        result["predictions"] = np.asarray(jnp.concatenate(predictions))
    return result


def moving_average(values: np.ndarray, smoothing: float, start: float | None = None) -> float:
    """The seed's moving-average loss: m <- (1 - s) * m + s * v, starting at the first value."""
    m = start
    for v in np.asarray(values, np.float64):
        m = float(v) if m is None else (1.0 - smoothing) * m + smoothing * float(v)
    return float("nan") if m is None else m


def format_epoch(record: dict[str, Any]) -> str:
    """One line in the seed's form, plus time and throughput."""
    return (f"Epoch {record['epoch']}. Loss: {record['moving_loss']:.4g}, "
            f"Train_acc {record['train_accuracy']:.4f}, Test_acc {record['test_accuracy']:.4f}, "
            f"{record['epoch_time']:.1f} s, {record['images_per_second']:.0f} img/s")


def steps_per_epoch(config: Config, num_train: int) -> int:
    """Full batches per epoch (the last partial batch is dropped)."""
    return num_train // config.batch_size


@dataclasses.dataclass
class TrainState:
    """Everything a run needs to continue exactly where it stopped; what a checkpoint holds."""

    params: model.Params
    opt_state: Any
    step: int = 0                          # training steps done, over all epochs
    moving_loss: float | None = None       # the seed's moving-average loss after `step` steps
    epoch_losses: list[float] = dataclasses.field(default_factory=list)  # this epoch's step losses so far
    epoch_correct: int = 0                 # this epoch's correct training predictions so far
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one record per finished epoch


def _no_op(*args: Any) -> None:
    del args


@dataclasses.dataclass
class Hooks:
    """What `fit` calls besides training; the defaults do nothing (no workdir).

    on_log(record):        every `log_every` steps, a {"kind": "train", ...} record
    on_epoch(state, rec):  after each epoch's evaluation (a workdir saves metrics and a checkpoint)
    should_stop(step):     polled after every step; True makes `fit` call on_stop, then raise Stopped
    on_stop(state):        the state to save before stopping (mid-epoch, or right after an epoch)
    """

    on_log: Callable[[dict[str, Any]], None] = _no_op
    on_epoch: Callable[[TrainState, dict[str, Any]], None] = _no_op
    should_stop: Callable[[int], bool] = lambda step: False
    on_stop: Callable[[TrainState], None] = _no_op


class Stopped(Exception):
    """`fit` stopped early because `Hooks.should_stop` asked it to, after `Hooks.on_stop`."""

    def __init__(self, step: int):
        super().__init__(f"training stopped at step {step}")
        self.step = step


def train_and_evaluate(config: Config, workdir: str | None = None,
                       dataset: data_lib.Dataset | None = None, *, resume: bool = False,
                       overwrite: bool = False, tensorboard: bool = False) -> list[dict[str, Any]]:
    """Train for `config.epochs` epochs; return one record per epoch (losses, accuracies, time).

    `dataset` defaults to `data.load(config)`. Nothing is written when `workdir` is None;
    otherwise the run keeps its config, metrics, checkpoints and plots there (see
    `cnn_jax.run`), `resume` continues its latest checkpoint and `overwrite` replaces it.
    """
    if workdir is not None:
        from cnn_jax import run  # run imports this module
        return run.train_in_workdir(config, workdir, dataset, resume=resume, overwrite=overwrite,
                                    tensorboard=tensorboard)
    if dataset is None:
        dataset = data_lib.load(config)
        print(f"data: {dataset.source}", flush=True)
    return fit(config, dataset)[2]


@functools.lru_cache(maxsize=16)
def compiled_runner(config: Config, total_steps: int, loop: str):
    """(optimizer, jitted runner) for a config; cached, so fitting one config again (a resumed
    or repeated run in the same process) reuses the compiled step instead of recompiling it."""
    optimizer = optim.make_optimizer(config, total_steps)
    train_step = parallel.data_parallel(config).wrap_step(make_train_step(config, optimizer))
    return optimizer, (make_step_runner if loop == "step" else make_scan_runner)(config, train_step)


def compile_ahead(config: Config, dataset: data_lib.Dataset, optimizer: optax.GradientTransformation,
                  runner: Callable, loop: str, num_steps: int) -> None:
    """Compile `fit`'s training runner and evaluation batch for the dataset's shapes, from
    abstract values, so the jit caches hold them when `fit` first calls them.

    Run in a thread, the compiles overlap drawing the initial params (also mostly
    compilation, on one core). A failure here is left for the real call to report."""
    try:
        params = jax.eval_shape(functools.partial(model.init, config=config), jax.random.key(0))
        opt_state = jax.eval_shape(optimizer.init, params)
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)   # noqa: E731
        data = (spec(dataset.train_images), spec(dataset.train_labels),
                jax.ShapeDtypeStruct(dataset.train_labels.shape, jnp.int32))
        step = jax.ShapeDtypeStruct((), jnp.int32)
        if loop == "step":
            runner.lower(params, opt_state, *data, step).compile()
        else:
            runner.lower(params, opt_state, *data, step, num_steps).compile()
        for images, labels in ((dataset.train_images, dataset.train_labels),
                               (dataset.test_images, dataset.test_labels)):
            bs = min(config.eval_batch_size, len(labels))
            _eval_batch.lower(params, jax.ShapeDtypeStruct((bs,) + images.shape[1:], images.dtype),
                              jax.ShapeDtypeStruct((bs,), labels.dtype),
                              jax.ShapeDtypeStruct((bs,), jnp.bool_),
                              lowering.inference_config(config)).compile()
    except Exception:  # noqa: BLE001 - the same error surfaces, in context, from the real call
        pass


def fit(config: Config, dataset: data_lib.Dataset, start: TrainState | None = None,
        hooks: Hooks | None = None) -> tuple[model.Params, Any, list[dict[str, Any]]]:
    """Train on `dataset` from `start` (default: fresh init); return (params, opt_state, history).

    A `start` taken mid-epoch continues that epoch's permutation after the `start.step`
    batches already done, with its moving loss and partial sums, so a resumed run computes
    what an uninterrupted one does. Losses come to the host every `log_every` steps; a
    non-finite loss or parameter raises FloatingPointError naming the step.
    """
    hooks = hooks or Hooks()
    num_steps = steps_per_epoch(config, len(dataset.train_labels))
    if num_steps == 0:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than the "
                          f"{len(dataset.train_labels)} training images")
    loop = resolve_loop(config)
    optimizer, runner = compiled_runner(config, num_steps * config.epochs, loop)
    dp = parallel.data_parallel(config)   # a no-op on one device
    print(f"strategy: {lowering.resolve(config).describe()}, {dp.describe()}", flush=True)
    compiling = None
    if dp.mesh is None:   # sharded arguments would compile another program
        compiling = threading.Thread(target=compile_ahead, daemon=True,
                                     args=(config, dataset, optimizer, runner, loop, num_steps))
        compiling.start()   # XLA compiles on another core while the params are drawn
    if start is None:
        params = model.init(jax.random.key(config.seed), config)
        state = TrainState(params, optimizer.init(params))
    else:
        state = dataclasses.replace(
            start, params=jax.tree.map(jnp.asarray, start.params),
            opt_state=jax.tree.map(jnp.asarray, start.opt_state),
            epoch_losses=list(start.epoch_losses), history=list(start.history))
    if compiling is not None:
        compiling.join()
    if config.debug:
        model.apply(state.params, jnp.zeros((config.batch_size,) + tuple(config.input_shape)), config,
                    debug=True)

    train_images, train_labels, test_images, test_labels = dp.replicate(
        (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels))
    params, opt_state = dp.replicate((state.params, state.opt_state))
    for epoch in range(state.step // num_steps, config.epochs):
        first = state.step - epoch * num_steps
        if first == 0:
            state.epoch_losses, state.epoch_correct = [], 0
        order = dp.replicate(data_lib.epoch_permutation(config.seed, epoch, len(dataset.train_labels)))
        bar = progress.epoch_progress(epoch, num_steps, first)
        epoch_start = time.perf_counter()
        last_absorb = epoch_start

        def absorb(step_metrics: list[Metrics] | Metrics) -> None:
            """Bring losses since the last call to the host: check, accumulate, log."""
            nonlocal last_absorb
            host = jax.device_get(step_metrics)  # stacked on the host: no per-length compiles
            if isinstance(host, list):
                host = {key: np.stack([m[key] for m in host]) for key in host[0]}
            losses, correct = np.asarray(host["loss"]), np.asarray(host["correct"])
            bad = np.flatnonzero(~np.isfinite(losses) | ~np.asarray(host["finite"]))
            if bad.size:
                what = (f"loss became {losses[bad[0]]}" if not np.isfinite(losses[bad[0]])
                        else "parameters or optimiser state became non-finite")
                raise FloatingPointError(f"{what} at step {state.step + bad[0] + 1} (epoch {epoch}); "
                                         "lower --learning_rate")
            now = time.perf_counter()
            # The rate of the steps absorbed now, shared by their log lines (a scanned epoch
            # arrives in one piece; one call per batch is absorbed at every log line).
            ips = len(losses) * config.batch_size / max(now - last_absorb, 1e-9)
            last_absorb = now
            for loss, right in zip(losses, correct):
                state.step += 1
                state.moving_loss = moving_average([loss], config.loss_smoothing, state.moving_loss)
                state.epoch_losses.append(float(loss))
                state.epoch_correct += int(right)
                if state.step % config.log_every == 0:
                    window = state.epoch_losses[-config.log_every:]
                    record = {"kind": "train", "step": state.step, "epoch": epoch,
                              "loss": float(np.mean(window)), "moving_loss": state.moving_loss,
                              "images_per_second": ips}
                    hooks.on_log(record)
                    bar.log(state.step, record["loss"], ips)

        if loop == "step":
            pending: list[Metrics] = []
            for step in range(first, num_steps):
                params, opt_state, metrics = runner(params, opt_state, train_images, train_labels,
                                                    order, np.int32(step))
                pending.append(metrics)
                bar.advance()
                done = epoch * num_steps + step + 1
                stop = step < num_steps - 1 and hooks.should_stop(done)
                if done % config.log_every == 0 or step == num_steps - 1 or stop:
                    absorb(pending)
                    pending = []
                if stop:
                    bar.close()
                    state.params, state.opt_state = params, opt_state
                    hooks.on_stop(state)
                    raise Stopped(state.step)
        else:
            params, opt_state, metrics = runner(params, opt_state, train_images, train_labels,
                                                order, np.int32(first), num_steps - first)
            bar.advance(num_steps - first)
            absorb(metrics)
        bar.close()
        epoch_time = time.perf_counter() - epoch_start
        state.params, state.opt_state = params, opt_state
        if config.train_eval == "full":
            train_eval = evaluate(params, train_images, train_labels, config)
        else:
            train_eval = {"loss": float(np.mean(np.asarray(state.epoch_losses, np.float32))),
                          "accuracy": state.epoch_correct / (num_steps * config.batch_size)}
        test_eval = evaluate(params, test_images, test_labels, config)
        record = {
            "epoch": epoch, "step": state.step, "moving_loss": state.moving_loss,
            "train_loss": train_eval["loss"], "train_accuracy": train_eval["accuracy"],
            "test_loss": test_eval["loss"], "test_accuracy": test_eval["accuracy"],
            "epoch_time": epoch_time,
            "images_per_second": (num_steps - first) * config.batch_size / epoch_time,
        }
        state.history.append(record)
        state.epoch_losses, state.epoch_correct = [], 0
        print(format_epoch(record), flush=True)
        hooks.on_epoch(state, record)
        if epoch < config.epochs - 1 and hooks.should_stop(state.step):
            hooks.on_stop(state)
            raise Stopped(state.step)
    return params, opt_state, state.history
