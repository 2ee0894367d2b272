"""Optimisers: optax's sgd / momentum / adam / adamw with a learning-rate schedule, an optional
linear warm-up (`--warmup_steps`), gradient clipping (`--grad_clip_norm`) and weight decay for
sgd / momentum (`--sgd_weight_decay`); each of those off leaves the optimiser as it was.

Every optimiser is an `optax.GradientTransformation`; `apply_updates` adds the
updates to the params. Plain `sgd` at a constant rate is the tutorial's update,
exactly `p - lr * grad` (on the summed loss with `--loss_reduction=sum`).

`make_optimizer` wraps the optimiser in `optax.inject_hyperparams`: the learning rate (the
schedule's peak), momentum and weight decay are arrays in the optimiser state
(`opt_state.hyperparams`), not constants of the compiled step. Runs that differ only in them
share one program, each carrying its own values (the vmapped groups of `cnn_jax.sweep`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from cnn_jax.config import Config, fields_with_role


# The optimiser's per-run values: Config fields carried in `opt_state.hyperparams`.
HYPERPARAMS = fields_with_role("hyperparam")


def learning_rate_schedule(config: Config, total_steps: int, learning_rate: Any = None) -> optax.Schedule | Any:
    """The configured learning rate: a constant, or an optax schedule over `total_steps` whose
    peak is `learning_rate` (default `config.learning_rate`; may be a traced array)."""
    lr = config.learning_rate if learning_rate is None else learning_rate
    steps = max(total_steps, 1)
    if config.warmup_steps:
        # Linear warm-up from 0 to the peak, then the schedule over the remaining steps (Goyal et al.
        # 2017, "Accurate, Large Minibatch SGD"): warmup_cosine is cosine with a tenth's warm-up.
        warmup = min(config.warmup_steps, steps)
        rest = learning_rate_schedule(dataclasses.replace(config, warmup_steps=0), steps - warmup, lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                     rest if callable(rest) else optax.constant_schedule(rest)], [warmup])
    if config.schedule == "constant":
        return lr
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, steps)
    if config.schedule == "onecycle":
        return optax.cosine_onecycle_schedule(steps, lr)
    if config.schedule == "warmup_cosine":
        # optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps) written out: the same
        # schedule, but `lr` may be a traced array (cnn_jax.sweep vmaps over learning rates).
        warmup = max(steps // 10, 1)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                     optax.cosine_decay_schedule(lr, steps - warmup)], [warmup])
    raise ValueError(f"unknown schedule {config.schedule!r}")


def base_optimizer(config: Config, total_steps: int, learning_rate: Any, momentum: Any,
                   weight_decay: Any) -> optax.GradientTransformation:
    """The optimiser `config.optimizer` names with its schedule, for the given per-run values,
    after clipping the gradient to `--grad_clip_norm` (optax.clip_by_global_norm) when set."""
    optimizer = _optimizer(config, learning_rate_schedule(config, total_steps, learning_rate), momentum, weight_decay)
    if config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer


def _optimizer(config: Config, lr: Any, momentum: Any, weight_decay: Any) -> optax.GradientTransformation:
    if config.optimizer in ("sgd", "momentum"):
        trace = momentum if config.optimizer == "momentum" else None
        if config.sgd_weight_decay == "l2":
            # wd * p added to the gradient before momentum: torch.optim.SGD's weight_decay.
            return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=trace))
        if config.sgd_weight_decay == "decoupled":
            # wd * p added to the update after momentum, then scaled by the rate: SGDW (Loshchilov &
            # Hutter 2019, "Decoupled Weight Decay Regularization"), as optax.adamw does for Adam.
            return optax.chain(*([optax.trace(decay=trace)] if trace is not None else []),
                               optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(lr))
        return optax.sgd(lr, momentum=trace)
    if config.optimizer == "adam":
        return optax.adam(lr)
    if config.optimizer == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def make_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    """The optimiser `config.optimizer` names, with its learning-rate schedule; its
    `HYPERPARAMS` start at the config's values and live in the state (`inject_hyperparams`)."""

    def build(learning_rate, momentum, weight_decay):
        return base_optimizer(config, total_steps, learning_rate, momentum, weight_decay)

    return optax.inject_hyperparams(build)(**{name: getattr(config, name) for name in HYPERPARAMS})


def apply_updates(params: Any, updates: Any) -> Any:
    """params + updates, leaf by leaf."""
    return jax.tree.map(lambda p, u: p + u, params, updates)
