"""Training: a pure, jit-compiled train step, batched evaluation, `train_and_evaluate`.

The whole dataset is put on the device once; a training step receives the
epoch's permutation and its step number and gathers its batch inside the
compiled program, so the hot path makes no per-batch host copies.
Two execution strategies share the same step: `step` (one jitted call per
batch) and `scan` (a whole epoch inside one `lax.scan`).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn_jax import data as data_lib
from cnn_jax import layers, model, optim
from cnn_jax.config import Config

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
        return optim.apply_updates(params, updates), opt_state, metrics

    return train_step


def _gather_batch(images, labels, order, step, batch_size):
    idx = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size)
    return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0)


def make_step_runner(config: Config, train_step: StepFn):
    """Jitted one-batch runner: (params, opt_state, images, labels, order, step) -> ...; donates state."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run(params, opt_state, images, labels, order, step):
        batch = _gather_batch(images, labels, order, step, config.batch_size)
        return train_step(params, opt_state, *batch)

    return run


def make_scan_runner(config: Config, train_step: StepFn):
    """Jitted runner of steps [first, first + num_steps) of an epoch inside one `lax.scan`."""

    @functools.partial(jax.jit, donate_argnums=(0, 1), static_argnums=(6,))
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
    """The execution strategy: `auto` picks per-batch steps on CPU, a scanned epoch elsewhere."""
    if config.loop != "auto":
        return config.loop
    return "step" if jax.default_backend() == "cpu" else "scan"


@functools.partial(jax.jit, static_argnums=(4,))
def _eval_batch(params, images, labels, mask, config):
    logits = model.apply(params, images, config)
    losses = layers.softmax_cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels)
    return jnp.sum(losses * mask), jnp.sum(correct * mask), logits


def evaluate(params: model.Params, images: jax.Array, labels: jax.Array, config: Config,
             return_predictions: bool = False) -> dict[str, Any]:
    """Mean loss and accuracy over (images, labels), in batches of `config.eval_batch_size`.

    The last batch is padded and masked, so every batch has one shape (one compile).
    """
    n, bs = len(labels), config.eval_batch_size
    bs = min(bs, n)
    loss_sum, correct_sum, predictions = 0.0, 0, []
    for start in range(0, n, bs):
        x, y = images[start:start + bs], labels[start:start + bs]
        real = len(y)
        mask = jnp.arange(bs) < real
        if real < bs:
            x = jnp.concatenate([x, jnp.zeros((bs - real,) + x.shape[1:], x.dtype)])
            y = jnp.concatenate([y, jnp.zeros((bs - real,), y.dtype)])
        batch_loss, batch_correct, logits = _eval_batch(params, x, y, mask, config)
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


def train_and_evaluate(config: Config, workdir: str | None = None,
                       dataset: data_lib.Dataset | None = None) -> list[dict[str, Any]]:
    """Train for `config.epochs` epochs; return one record per epoch (losses, accuracies, time).

    `dataset` defaults to `data.load(config)`. Nothing is written when `workdir` is None.
    """
    del workdir  # Run directories: see the workflow issue.
    if dataset is None:
        dataset = data_lib.load(config)
    return fit(config, dataset)[2]


def fit(config: Config, dataset: data_lib.Dataset) -> tuple[model.Params, Any, list[dict[str, Any]]]:
    """Train on `dataset`; return (params, opt_state, per-epoch history)."""
    num_steps = steps_per_epoch(config, len(dataset.train_labels))
    if num_steps == 0:
        raise ValueError(f"--batch_size={config.batch_size} is larger than the "
                         f"{len(dataset.train_labels)} training images")
    optimizer = optim.make_optimizer(config, num_steps * config.epochs)
    params = model.init(jax.random.key(config.seed), config)
    if config.debug:
        model.apply(params, jnp.zeros((config.batch_size,) + tuple(config.input_shape)), config, debug=True)
    opt_state = optimizer.init(params)
    train_step = make_train_step(config, optimizer)
    loop = resolve_loop(config)
    runner = (make_step_runner if loop == "step" else make_scan_runner)(config, train_step)

    train_images, train_labels = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
    test_images, test_labels = jnp.asarray(dataset.test_images), jnp.asarray(dataset.test_labels)
    history, moving_loss = [], None
    for epoch in range(config.epochs):
        order = jnp.asarray(data_lib.epoch_permutation(config.seed, epoch, len(dataset.train_labels)))
        start = time.perf_counter()
        if loop == "step":
            step_metrics = []
            for step in range(num_steps):
                params, opt_state, metrics = runner(params, opt_state, train_images, train_labels,
                                                    order, np.int32(step))
                step_metrics.append(metrics)
            metrics = jax.tree.map(lambda *m: jnp.stack(m), *step_metrics)
        else:
            params, opt_state, metrics = runner(params, opt_state, train_images, train_labels,
                                                order, np.int32(0), num_steps)
        losses = np.asarray(metrics["loss"])
        train_correct = int(np.sum(metrics["correct"]))
        epoch_time = time.perf_counter() - start
        moving_loss = moving_average(losses, config.loss_smoothing, moving_loss)
        if not np.all(np.isfinite(losses)):
            bad = int(np.argmin(np.isfinite(losses)))
            raise FloatingPointError(f"loss became {losses[bad]} at step {epoch * num_steps + bad} "
                                     f"(epoch {epoch}); lower --learning_rate")
        if config.train_eval == "full":
            train_eval = evaluate(params, train_images, train_labels, config)
        else:
            train_eval = {"loss": float(np.mean(losses)),
                          "accuracy": train_correct / (num_steps * config.batch_size)}
        test_eval = evaluate(params, test_images, test_labels, config)
        record = {
            "epoch": epoch, "step": (epoch + 1) * num_steps, "moving_loss": moving_loss,
            "train_loss": train_eval["loss"], "train_accuracy": train_eval["accuracy"],
            "test_loss": test_eval["loss"], "test_accuracy": test_eval["accuracy"],
            "epoch_time": epoch_time, "images_per_second": num_steps * config.batch_size / epoch_time,
        }
        history.append(record)
        print(format_epoch(record), flush=True)
    return params, opt_state, history
