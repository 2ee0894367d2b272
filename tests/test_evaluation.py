"""Evaluation: padded, masked batches give the unbatched numbers; stacked runs evaluate as each alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.engine import evaluation, state
from cnn_jax.config import Config


@pytest.fixture(scope="module")
def small(mnist):
    """1,000 real test images."""
    return dataclasses.replace(mnist, test_images=mnist.test_images[:1000], test_labels=mnist.test_labels[:1000])


def test_evaluate_pads_the_last_batch(small):
    config = config_lib.replace(Config(), eval_batch_size=300)
    params, model_state = model.init(jax.random.key(0), config)
    x, y = jnp.asarray(small.test_images), jnp.asarray(small.test_labels)
    batched = evaluation.evaluate(params, model_state, x, y, config, return_predictions=True)
    logits, _ = jax.jit(lambda p, s, x: model.apply(p, s, x, config))(params, model_state, x)   # one program
    assert batched["accuracy"] == pytest.approx(float(jnp.mean(jnp.argmax(logits, -1) == y)))
    np.testing.assert_array_equal(batched["predictions"], np.asarray(jnp.argmax(logits, -1)))



@pytest.mark.parametrize("vectorised", [False, True])
def test_stacked_runs_evaluate_as_each_alone(small, vectorised):
    config = config_lib.replace(Config(), eval_batch_size=300)
    x, y = jnp.asarray(small.test_images[:500]), jnp.asarray(small.test_labels[:500])
    runs = [model.init(jax.random.key(seed), config) for seed in (0, 1)]
    stacked = state.stack([{"params": p, "model_state": s} for p, s in runs])
    together = evaluation.evaluate_runs(stacked["params"], stacked["model_state"], x, y, config,
                                        return_predictions=True, vectorised=vectorised)
    for r, (params, model_state) in enumerate(runs):
        alone = evaluation.evaluate(params, model_state, x, y, config, return_predictions=True)
        assert together["accuracy"][r] == pytest.approx(alone["accuracy"])
        assert together["loss"][r] == pytest.approx(alone["loss"], rel=1e-5)
        np.testing.assert_array_equal(together["predictions"][r], alone["predictions"])
