"""The compiled pieces of training and evaluation: one train step over the train state, the two
runners that drive it, and the evaluation of one batch.

The whole dataset is put on the device once; a runner receives the epoch's permutation and a
step number and gathers its batch inside the compiled program, so the hot path makes no
per-batch host copies. Two execution strategies share the same step: `step` (one jitted call
per batch) and `scan` (steps inside one `lax.scan`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from cnn_jax import model
from cnn_jax.config import Config
from cnn_jax.data import augment
from cnn_jax.engine import optim
from cnn_jax.engine.state import TrainState, step_rng
from cnn_jax.nn import layers, lowering

Metrics = dict[str, jax.Array]
Batch = tuple[jax.Array, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
# The augmentation of step s draws from fold_in(step key, AUGMENT_STREAM), apart from the
# model's own randomness (dropout), which uses the step key itself; mixup / cutmix draw from
# fold_in(step key, MIX_STREAM).
AUGMENT_STREAM = 0xA06
MIX_STREAM = 0x313
# The labels a mixed batch's examples are mixed with and their weight (`augment.mix_batch`).
Mix = tuple[jax.Array, jax.Array]


def loss_fn(params: model.Params, model_state: model.ModelState, batch: Batch, rng: jax.Array,
            config: Config, mix: Mix | None = None) -> tuple[jax.Array, tuple[Metrics, model.ModelState]]:
    """The training objective (per-example cross-entropy, label-smoothed by `--label_smoothing`,
    summed or averaged), batch metrics and the model state after the batch. With `mix` = (other
    labels, lam) of a mixed batch the example's loss is lam * CE(label) + (1 - lam) * CE(other)
    (timm's mixup target, written as the pair of losses); accuracy counts the batch's own labels."""
    images, labels = batch
    logits, model_state = model.apply(params, model_state, images, config, train=True, rng=rng)
    losses = layers.softmax_cross_entropy(logits, labels, config.label_smoothing)
    if mix is not None:
        other, lam = mix
        losses = lam * losses + (1.0 - lam) * layers.softmax_cross_entropy(logits, other, config.label_smoothing)
    loss = losses.sum() if config.loss_reduction == "sum" else losses.mean()
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    return loss, ({"loss": losses.mean(), "correct": correct}, model_state)


def make_train_step(config: Config, optimizer: optax.GradientTransformation) -> StepFn:
    """A pure step: (state, (images, labels)) -> (state, metrics); the batch is augmented first
    (`--augment_shift`, `--augment_flip`, `--random_erasing`), then mixed (`--mixup_alpha`,
    `--cutmix_alpha`), from the step's key."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        key = step_rng(state)
        if config.augment_shift or config.augment_flip or config.random_erasing:
            images, labels = batch
            batch = (augment.augment(jax.random.fold_in(key, AUGMENT_STREAM), images, config.augment_shift,
                                     config.augment_flip, config.random_erasing,
                                     (config.random_erasing_min_area, config.random_erasing_max_area),
                                     config.random_erasing_fill), labels)
        mix = None
        if config.mixup_alpha or config.cutmix_alpha:
            images, labels = batch
            images, perm, lam = augment.mix_batch(jax.random.fold_in(key, MIX_STREAM), images, config.mixup_alpha,
                                                  config.cutmix_alpha)
            batch, mix = (images, labels), (jnp.take(labels, perm, axis=0), lam)
        grads, (metrics, model_state) = jax.grad(loss_fn, has_aux=True)(
            state.params, state.model_state, batch, key, config, mix)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optim.apply_updates(state.params, updates)
        ema = state.ema
        if config.ema_decay > 0:   # the averaged weights evaluation uses (timm's ModelEma, big_vision's ema)
            ema = jax.tree.map(lambda e, p: config.ema_decay * e + (1.0 - config.ema_decay) * p, ema, params)
        # Divergence check: NaN can hide from the loss (relu/max drop it), never from the params;
        # an overflowing optimiser state (Adam's squared gradients) leaves the params finite but can
        # never be checkpointed, so it counts too.
        metrics["finite"] = jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((params, opt_state, model_state))
             if jnp.issubdtype(x.dtype, jnp.inexact)]))
        return state.replace(params=params, opt_state=opt_state, model_state=model_state,
                             step=state.step + 1, ema=ema), metrics

    return train_step


def gather_batch(images: jax.Array, labels: jax.Array, order: jax.Array, step: jax.Array,
                 batch_size: int) -> Batch:
    """Batch `step` of `order`; a stacked order (runs, n) gives one batch per run (sweep groups)."""
    idx = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size, axis=-1)
    return jnp.take(images, idx, axis=0), jnp.take(labels, idx, axis=0)


def make_step_runner(config: Config, train_step: StepFn):
    """Jitted one-batch runner: (state, images, labels, order, step) -> (state, metrics); donates
    the state. `step` is the step's index in the epoch (the batch it takes from `order`)."""

    @functools.partial(jax.jit, donate_argnums=(0,), compiler_options=lowering.compiler_options(config))
    def run(state, images, labels, order, step):
        return train_step(state, gather_batch(images, labels, order, step, config.batch_size))

    return run


def make_scan_runner(config: Config, train_step: StepFn):
    """Jitted runner of steps [first, first + num_steps) of an epoch inside one `lax.scan`:
    (state, images, labels, order, first, num_steps) -> (state, stacked metrics)."""

    @functools.partial(jax.jit, donate_argnums=(0,), static_argnums=(5,),
                       compiler_options=lowering.compiler_options(config))
    def run(state, images, labels, order, first, num_steps):
        def body(state, step):
            return train_step(state, gather_batch(images, labels, order, step, config.batch_size))

        return jax.lax.scan(body, state, first + jnp.arange(num_steps))

    return run


def make_runner(config: Config, train_step: StepFn, loop: str):
    """The runner of execution strategy `loop` (step | scan)."""
    return (make_step_runner if loop == "step" else make_scan_runner)(config, train_step)


@functools.partial(jax.jit, static_argnums=(5,))
def eval_batch(params: model.Params, model_state: model.ModelState, images: jax.Array, labels: jax.Array,
               mask: jax.Array, config: Config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed loss, correct count, logits) of one masked evaluation batch (`train=False`); the
    loss is the plain cross-entropy (no label smoothing). With `--tta_flip` the logits are the mean
    of the image's and its left-right mirror's (flip test-time augmentation)."""
    logits, _ = model.apply(params, model_state, images, config, train=False)
    if config.tta_flip:
        mirrored, _ = model.apply(params, model_state, images[:, :, ::-1, :], config, train=False)
        logits = (logits + mirrored) / 2
    losses = layers.softmax_cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels)
    return jnp.sum(losses * mask), jnp.sum(correct * mask), logits


def abstract_batch(images: Any, labels: Any, batch_size: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Shapes of an evaluation batch of `batch_size` (at most the data's length) and its mask."""
    bs = min(batch_size, len(labels))
    return (jax.ShapeDtypeStruct((bs,) + tuple(images.shape[1:]), images.dtype),
            jax.ShapeDtypeStruct((bs,), labels.dtype), jax.ShapeDtypeStruct((bs,), jnp.bool_))
