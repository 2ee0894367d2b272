"""The training loop (cnn_jax/engine/loop.py) and a feature written once in it: an exponential
moving average of the params (--ema_decay), which a plain run, a sweep group and a search batch
all evaluate, and which a checkpoint keeps so that a resumed run stays bit-exact."""

import dataclasses

import jax
import numpy as np
import pytest
from resume_checks import stop_and_resume

from cnn_jax import config as config_lib
from cnn_jax.config import Config, ConfigError
from cnn_jax.engine import evaluation, optim, state as state_lib, step as step_lib, train
from cnn_jax.search import trials
from cnn_jax import sweep

DECAY = 0.9
EMA = config_lib.replace(Config(), epochs=2, log_every=3, train_eval="running", ema_decay=DECAY,
                         learning_rate=0.003)


@pytest.fixture(scope="module")
def tiny(mnist):
    """640 real training images (10 steps of 64) and 200 real test images."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:640], train_labels=mnist.train_labels[:640],
                               test_images=mnist.test_images[:200], test_labels=mnist.test_labels[:200])


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _evaluated(params, state, images, labels, config):
    return evaluation.evaluate(params, state.model_state, images, labels, config)


def test_ema_decay_is_checked():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match=r"^--ema_decay=.* is not allowed: it must be in \[0, 1\)"):
            config_lib.validate(config_lib.replace(Config(), ema_decay=bad))


def test_the_average_follows_its_recurrence_step_by_step(tiny):
    """ema_s = d * ema_(s-1) + (1 - d) * params_s, starting at the initial params; off: no average."""
    optimizer = optim.make_optimizer(EMA, 10)
    state = state_lib.create(EMA, optimizer)
    assert state_lib.create(config_lib.replace(EMA, ema_decay=0.0), optimizer).ema is None
    assert _same(state.ema, state.params)
    train_step = jax.jit(step_lib.make_train_step(EMA, optimizer))
    want = jax.tree.map(np.asarray, state.params)
    for s in range(3):
        batch = (tiny.train_images[64 * s:64 * (s + 1)], tiny.train_labels[64 * s:64 * (s + 1)])
        state, _ = train_step(state, batch)
        want = jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * np.asarray(p), want, state.params)
        for got, expected in zip(jax.tree.leaves(state.ema), jax.tree.leaves(want)):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert not _same(state.ema, state.params)


def test_a_plain_run_evaluates_the_averaged_params(tiny):
    final, history = train.fit(EMA, tiny)
    averaged = _evaluated(final.ema, final, tiny.test_images, tiny.test_labels, EMA)
    raw = _evaluated(final.params, final, tiny.test_images, tiny.test_labels, EMA)
    assert history[-1]["test_loss"] == pytest.approx(averaged["loss"], rel=1e-6)
    assert history[-1]["test_accuracy"] == averaged["accuracy"]
    assert averaged["loss"] != pytest.approx(raw["loss"], rel=1e-4)   # the average really is other weights


def test_a_sweep_group_evaluates_each_runs_averaged_params(tiny):
    configs = [EMA, config_lib.replace(EMA, learning_rate=0.001, seed=1)]
    result = sweep.train_group(configs, tiny)
    for i, config in enumerate(configs):
        run_state = state_lib.unstack(result.state, i)
        averaged = _evaluated(run_state.ema, run_state, tiny.test_images, tiny.test_labels, config)
        raw = _evaluated(run_state.params, run_state, tiny.test_images, tiny.test_labels, config)
        assert result.histories[i][-1]["test_loss"] == pytest.approx(averaged["loss"], rel=1e-5)
        assert averaged["loss"] != pytest.approx(raw["loss"], rel=1e-4)


def test_a_search_batch_evaluates_each_trials_averaged_params(tiny):
    configs = [EMA, config_lib.replace(EMA, learning_rate=0.001, seed=1)]
    val_x, val_y = tiny.test_images, tiny.test_labels
    results = trials.train_trials(configs, tiny, val_x, val_y, 4, lambda members, evs: [False] * len(members))
    for config, result in zip(configs, results):
        assert result.status == trials.COMPLETE
        averaged = _evaluated(result.state.ema, result.state, val_x, val_y, config)
        raw = _evaluated(result.state.params, result.state, val_x, val_y, config)
        assert result.evaluations[-1]["validation_loss"] == pytest.approx(averaged["loss"], rel=1e-5)
        assert averaged["loss"] != pytest.approx(raw["loss"], rel=1e-4)


def test_a_run_with_an_average_resumes_bit_exactly_from_a_mid_epoch_checkpoint(tiny, tmp_path):
    config = config_lib.replace(EMA, loop="step")   # a stop request is polled after every step
    (whole, whole_history), (final, history), start = stop_and_resume(config, tiny, str(tmp_path / "run"), 13, 10)
    assert start[1].step == 13 and start[0].ema is not None
    assert _same(final.params, whole.params) and _same(final.ema, whole.ema)
    assert [h["test_accuracy"] for h in history] == [h["test_accuracy"] for h in whole_history]
    assert [h["test_loss"] for h in history] == [h["test_loss"] for h in whole_history]
