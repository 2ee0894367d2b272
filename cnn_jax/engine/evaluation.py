"""Evaluation: mean loss and accuracy of a model over a dataset, in padded, masked batches, for
one run or for the stacked runs of a sweep group."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import model
from cnn_jax.config import Config
from cnn_jax.engine import step
from cnn_jax.engine.state import unstack


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


def evaluate(params: model.Params, model_state: model.ModelState, images: jax.Array, labels: jax.Array,
             config: Config, return_predictions: bool = False,
             batch_fn: Callable | None = None) -> dict[str, Any]:
    """Mean loss and accuracy over (images, labels), in batches of `config.eval_batch_size`.

    The last batch is padded and masked, so every batch has one shape (one compile).
    `batch_fn(params, model_state, images, labels, mask)` is `step.eval_batch` at the config's
    inference lowering, compiled ahead for that shape (default: it, through jit).
    """
    n = len(labels)
    loss_sum, correct_sum, predictions = 0.0, 0, []
    if batch_fn is None:
        inference = model.inference_config(config)
        batch_fn = lambda p, s, x, y, m: step.eval_batch(p, s, x, y, m, inference)   # noqa: E731
    for x, y, mask, real in eval_batches(images, labels, config.eval_batch_size):
        batch_loss, batch_correct, logits = batch_fn(params, model_state, x, y, mask)
        loss_sum += batch_loss
        correct_sum += batch_correct
        if return_predictions:
            predictions.append(jnp.argmax(logits[:real], axis=-1))
    result = {"loss": float(loss_sum) / n, "accuracy": float(correct_sum) / n}
    if return_predictions:
        result["predictions"] = np.asarray(jnp.concatenate(predictions))
    return result


@functools.lru_cache(maxsize=16)
def _eval_runs_fn(config: Config):
    config = model.inference_config(config)   # what `evaluate` runs
    return jax.jit(jax.vmap(lambda p, s, x, y, m: step.eval_batch(p, s, x, y, m, config),
                            in_axes=(0, 0, None, None, None)))


def runs_evaluated_together() -> bool:
    """Whether `evaluate_runs` evaluates the runs of a group together by default (vmapped, on
    accelerators) rather than one after another (on CPU)."""
    return jax.default_backend() != "cpu"


def evaluate_runs(params: model.Params, model_state: model.ModelState, images: jax.Array, labels: jax.Array,
                  config: Config, return_predictions: bool = False,
                  vectorised: bool | None = None) -> dict[str, np.ndarray]:
    """`evaluate` for stacked params and model states: loss and accuracy per run (arrays over runs).

    `vectorised` (default: on accelerators) evaluates all runs in one vmapped call per batch;
    otherwise run by run with `evaluate`, which XLA:CPU runs faster (a vmapped batch is R times
    larger, and on CPU the time per image grows with the size of the arrays).
    """
    if vectorised is None:
        vectorised = runs_evaluated_together()
    if not vectorised:
        results = [evaluate(unstack(params, r), unstack(model_state, r), images, labels, config,
                            return_predictions)
                   for r in range(len(jax.tree.leaves(params)[0]))]
        return {key: np.stack([np.asarray(result[key]) for result in results]) for key in results[0]}
    fn = _eval_runs_fn(config)
    n = len(labels)
    loss_sum, correct_sum, predictions = 0.0, 0, []
    for x, y, mask, real in eval_batches(images, labels, config.eval_batch_size):
        batch_loss, batch_correct, logits = fn(params, model_state, x, y, mask)
        loss_sum += batch_loss
        correct_sum += batch_correct
        if return_predictions:
            predictions.append(jnp.argmax(logits[:, :real], axis=-1))
    result = {"loss": np.asarray(loss_sum, np.float64) / n,
              "accuracy": np.asarray(correct_sum, np.float64) / n}
    if return_predictions:
        result["predictions"] = np.asarray(jnp.concatenate(predictions, axis=1))
    return result
