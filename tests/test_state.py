"""The train state: one pytree; a fresh run's state; step keys from (rng, step) alone; stacking."""

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.engine import optim, state
from cnn_jax.config import Config

CONFIG = config_lib.replace(Config(), optimizer="momentum", learning_rate=0.05, momentum=0.8)


def test_a_fresh_state_holds_the_model_the_optimiser_and_the_seed():
    fresh = state.create(CONFIG, optim.make_optimizer(CONFIG, 10))
    params, model_state = model.init(jax.random.key(CONFIG.seed), CONFIG)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(params)))
    assert fresh.model_state == model_state == {}
    assert int(fresh.step) == 0 and fresh.rng.dtype == jnp.uint32
    assert float(fresh.opt_state.hyperparams["learning_rate"]) == np.float32(0.05)
    assert float(fresh.opt_state.hyperparams["momentum"]) == np.float32(0.8)
    shapes = state.abstract(CONFIG, optim.make_optimizer(CONFIG, 10))
    assert jax.tree.structure(shapes) == jax.tree.structure(fresh)
    assert [x.shape for x in jax.tree.leaves(shapes)] == [x.shape for x in jax.tree.leaves(fresh)]


def test_step_keys_depend_on_the_rng_and_the_step_only():
    fresh = state.create(CONFIG, optim.make_optimizer(CONFIG, 10))
    later = fresh.replace(step=jnp.int32(7))
    key = jax.random.key_data(state.step_rng(later))
    np.testing.assert_array_equal(key, jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(fresh.rng), 7)))
    assert not np.array_equal(key, jax.random.key_data(state.step_rng(fresh)))
    assert not np.array_equal(state.run_rng(CONFIG), state.run_rng(config_lib.replace(CONFIG, seed=1)))
    # Under jit and vmap alike (a sweep group draws each run's key from its own slice).
    stacked = state.stack([later, later.replace(step=jnp.int32(8))])
    keys = jax.jit(jax.vmap(lambda s: jax.random.key_data(state.step_rng(s))))(stacked)
    np.testing.assert_array_equal(keys[0], key)


def test_stack_and_unstack_are_inverse():
    a = state.create(CONFIG, optim.make_optimizer(CONFIG, 10))
    b = state.create(config_lib.replace(CONFIG, seed=3, learning_rate=0.01), optim.make_optimizer(CONFIG, 10))
    stacked = state.stack([a, b])
    assert stacked.params["conv1"]["w"].shape == (2,) + a.params["conv1"]["w"].shape
    for original, index in ((a, 0), (b, 1)):
        back = state.unstack(stacked, index)
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(original)))
