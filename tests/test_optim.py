"""Optimisers: plain SGD is exactly p - lr * g (the tutorial's update); every optax choice builds and steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax.engine import optim
from cnn_jax.config import Config

PARAMS = {"a": {"w": jnp.asarray([1.0, -2.0, 3.0]), "b": jnp.asarray([0.5])}}
GRADS = {"a": {"w": jnp.asarray([0.1, 0.2, -0.3]), "b": jnp.asarray([1.0])}}


def step(config):
    opt = optim.make_optimizer(config, total_steps=10)
    state = opt.init(PARAMS)
    updates, _ = opt.update(GRADS, state, PARAMS)
    return optim.apply_updates(PARAMS, updates)


def test_sgd_is_exactly_p_minus_lr_grad():
    new = step(config_lib.replace(Config(), optimizer="sgd", learning_rate=0.01))
    for p, g, n in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(GRADS), jax.tree.leaves(new)):
        np.testing.assert_array_equal(n, p - 0.01 * g)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle", "warmup_cosine"])
def test_optax_optimisers_move_against_the_gradient(name, schedule):
    new = step(config_lib.replace(Config(), optimizer=name, schedule=schedule, learning_rate=0.1))
    moved = [np.sign(np.asarray(p - n)) for p, n in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(new))]
    signs = [np.sign(np.asarray(g)) for g in jax.tree.leaves(GRADS)]
    for m, s in zip(moved, signs):
        if schedule in ("onecycle", "warmup_cosine") and not np.any(m):
            continue  # these schedules may start at (near) zero rate
        if name == "adamw":
            continue  # weight decay may dominate tiny gradients; checked below
        np.testing.assert_array_equal(m, s)


def test_adamw_decays_weights():
    zero = {"a": {"w": jnp.zeros(3), "b": jnp.zeros(1)}}
    opt = optim.make_optimizer(config_lib.replace(Config(), optimizer="adamw", weight_decay=0.5,
                                                  learning_rate=0.1), 10)
    updates, _ = opt.update(zero, opt.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["a"]["w"], -0.1 * 0.5 * PARAMS["a"]["w"], rtol=1e-6)


def test_schedules_follow_their_shape():
    config = config_lib.replace(Config(), learning_rate=1.0)
    assert optim.learning_rate_schedule(config, 100) == 1.0
    cos = optim.learning_rate_schedule(config_lib.replace(config, schedule="cosine"), 100)
    assert float(cos(0)) == 1.0 and float(cos(100)) < 1e-6
    one = optim.learning_rate_schedule(config_lib.replace(config, schedule="onecycle"), 100)
    assert float(one(0)) < 0.1 and abs(float(one(30)) - 1.0) < 0.05 and float(one(100)) < 1e-3
