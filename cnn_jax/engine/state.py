"""The train state: one pytree with everything a training step reads and changes.

    state = TrainState(params, opt_state, model_state, rng, step, ema)

`params` and `model_state` are the model's (`cnn_jax.model`), `opt_state` the optimiser's
(its per-run hyperparameters included, `optim.make_optimizer`), `rng` the run's key as raw
key data (uint32, so it checkpoints, replicates and stacks like any array) and `step` the
number of training steps done; `ema` the exponential moving average of the params
(`--ema_decay`; None when off), which evaluation uses in their place. The randomness of step s comes from
`step_rng(state) = fold_in(rng, s)`: the same numbers whether steps run one by one, in a
scan, in a vmapped sweep group or after a resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cnn_jax import model
from cnn_jax.config import Config

# The run's step keys are fold_in(key(seed), RNG_STREAM): a stream apart from the init draws,
# which use key(seed) itself (so the params are those of the stateless code before).
RNG_STREAM = 0x5EED


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """params, optimiser state, model state, rng key data and step count, as one pytree."""

    params: Any
    opt_state: Any
    model_state: Any
    rng: jax.Array    # raw key data (uint32), `jax.random.key_data` of a key
    step: jax.Array   # int32 scalar: training steps done
    ema: Any = None   # moving average of params (--ema_decay > 0), else None

    def replace(self, **changes: Any) -> "TrainState":
        return dataclasses.replace(self, **changes)


def run_rng(config: Config) -> jax.Array:
    """The key data of a run's per-step randomness, from its seed."""
    return jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), RNG_STREAM))


def step_rng(state: TrainState) -> jax.Array:
    """The key of the step `state.step` (a typed key): fold_in(rng, step)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def create(config: Config, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh run's state: the model initialised from key(seed), the optimiser's state, step 0."""
    params, model_state = model.init(jax.random.key(config.seed), config)
    ema = jax.tree.map(jnp.copy, params) if config.ema_decay > 0 else None
    return TrainState(params, optimizer.init(params), model_state, run_rng(config),
                      jnp.zeros((), jnp.int32), ema)


def eval_params(state: TrainState) -> Any:
    """The params evaluation uses: the moving average where the run keeps one, else the params."""
    return state.params if state.ema is None else state.ema


def abstract(config: Config, optimizer: optax.GradientTransformation) -> TrainState:
    """Shapes and dtypes of `create`'s state, computed without allocating."""
    return jax.eval_shape(lambda: create(config, optimizer))


def stack(states: list[TrainState]) -> TrainState:
    """States of several runs stacked along a new leading axis (a vmapped sweep group)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack(stacked: Any, index: int) -> Any:
    """Run `index`'s slice of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], stacked)
