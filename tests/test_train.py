"""Training: determinism, real-data learning, strategy equivalence, evaluation, the moving loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import data, lowering, model, optim, train
from cnn_jax.config import Config


@pytest.fixture(scope="module")
def small(mnist):
    """2,048 real training images and 1,000 real test images."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:2048], train_labels=mnist.train_labels[:2048],
                               test_images=mnist.test_images[:1000], test_labels=mnist.test_labels[:1000])


def leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_same_seed_gives_bit_identical_params(small):
    config = config_lib.replace(Config(), train_eval="running", loop="step")
    cut = dataclasses.replace(small, train_images=small.train_images[:640], train_labels=small.train_labels[:640])
    p1, _, h1 = train.fit(config, cut)
    p2, _, h2 = train.fit(config, cut)
    assert leaves_equal(p1, p2)
    assert h1[0]["moving_loss"] == h2[0]["moving_loss"]
    p3, _, _ = train.fit(config_lib.replace(config, seed=1), cut)
    assert not leaves_equal(p1, p3)


def test_short_real_run_learns(small):
    config = config_lib.replace(Config(), epochs=2)
    params0 = model.init(jax.random.key(config.seed), config)
    before = train.evaluate(params0, jnp.asarray(small.test_images), jnp.asarray(small.test_labels), config)
    params, _, history = train.fit(config, small)
    assert before["accuracy"] < 0.3
    assert history[-1]["test_accuracy"] > 0.85
    assert history[-1]["train_loss"] < history[0]["train_loss"] < before["loss"]
    assert set(history[0]) >= {"epoch", "moving_loss", "train_accuracy", "test_accuracy", "epoch_time",
                               "images_per_second"}


def test_step_and_scan_loops_agree(small):
    """Two programs (a jitted step, a scanned epoch) fuse and round differently, depending on the
    CPU: two plain SGD steps, each leaf compared relative to its update (tests/numerics.py)."""
    cut = dataclasses.replace(small, train_images=small.train_images[:128], train_labels=small.train_labels[:128])
    base = config_lib.replace(Config(), optimizer="sgd", learning_rate=0.1, train_eval="running")
    results = [train.fit(config_lib.replace(base, loop=loop), cut) for loop in ("step", "scan")]
    numerics.assert_updates_close(results[1][0], results[0][0], model.init(jax.random.key(base.seed), base),
                                  what="scan against step")
    assert abs(results[0][2][0]["moving_loss"] - results[1][2][0]["moving_loss"]) < 1e-4


def test_train_step_is_pure_and_matches_a_manual_update(small):
    config = config_lib.replace(config_lib.PRESETS["seed"])
    params = model.init(jax.random.key(0), config)
    opt = optim.make_optimizer(config, 1)
    images, labels = jnp.asarray(small.train_images[:64]), jnp.asarray(small.train_labels[:64])
    new, _, metrics = jax.jit(train.make_train_step(config, opt))(params, opt.init(params), images, labels)
    grads = jax.grad(lambda p: train.loss_fn(p, images, labels, config)[0])(params)
    for p, g, n in zip(jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(new)):
        np.testing.assert_allclose(n, p - 0.01 * g, rtol=1e-5, atol=1e-7)
    assert 2.0 < float(metrics["loss"]) < 2.6  # ~log(10) at a near-zero init


def test_evaluate_pads_the_last_batch(small):
    config = config_lib.replace(Config(), eval_batch_size=300)
    params = model.init(jax.random.key(0), config)
    x, y = jnp.asarray(small.test_images), jnp.asarray(small.test_labels)
    batched = train.evaluate(params, x, y, config, return_predictions=True)
    logits = model.apply(params, x, config)
    assert batched["accuracy"] == pytest.approx(float(jnp.mean(jnp.argmax(logits, -1) == y)))
    np.testing.assert_array_equal(batched["predictions"], np.asarray(jnp.argmax(logits, -1)))


def test_moving_average_is_the_seeds():
    assert train.moving_average(np.array([2.0, 1.0]), 0.01) == pytest.approx(0.99 * 2.0 + 0.01 * 1.0)
    assert train.moving_average(np.array([1.0]), 0.5, start=3.0) == pytest.approx(2.0)


def test_format_epoch_is_the_seeds_line():
    line = train.format_epoch({"epoch": 0, "moving_loss": 0.1712, "train_accuracy": 0.9651,
                               "test_accuracy": 0.9628, "epoch_time": 19.83, "images_per_second": 3030.4})
    assert line == "Epoch 0. Loss: 0.1712, Train_acc 0.9651, Test_acc 0.9628, 19.8 s, 3030 img/s"


def test_an_overflowing_optimiser_state_is_divergence_at_its_step(small):
    """Adam at lr 1e6: the params stay finite but the squared-gradient state overflows, which no
    checkpoint could hold; the step's `finite` flag reports it (tests/test_sweep.py trains into it)."""
    config = config_lib.replace(Config(), conv_filters=(4,), conv_kernels=(3,), num_fc=16, learning_rate=1e6)
    optimizer = optim.make_optimizer(config, 10)
    params = model.init(jax.random.key(0), config)
    opt_state = optimizer.init(params)
    adam = opt_state[0]
    poisoned = (adam._replace(nu=jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), adam.nu)), *opt_state[1:])
    step = jax.jit(train.make_train_step(config, optimizer))
    images, labels = jnp.asarray(small.train_images[:32]), jnp.asarray(small.train_labels[:32])
    assert bool(step(params, opt_state, images, labels)[2]["finite"])
    new_params, _, metrics = step(params, poisoned, images, labels)
    assert not bool(metrics["finite"])
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(new_params))   # the params alone look fine


@pytest.mark.parametrize("loop", ["step", "scan"])
def test_compile_ahead_leaves_nothing_to_compile_for_fit(small, loop):
    config = config_lib.replace(Config(), loop=loop, eval_batch_size=300, seed=7)
    cut = dataclasses.replace(small, train_images=small.train_images[:320], train_labels=small.train_labels[:320],
                              test_images=small.test_images[:500], test_labels=small.test_labels[:500])
    num_steps = train.steps_per_epoch(config, len(cut.train_labels))
    optimizer, runner = train.compiled_runner(config, num_steps * config.epochs, loop)
    train.compile_ahead(config, cut, optimizer, runner, loop, num_steps)
    params = model.init(jax.random.key(config.seed), config)
    opt_state = optimizer.init(params)
    order = jnp.asarray(data.epoch_permutation(config.seed, 0, len(cut.train_labels)))
    images, labels = jnp.asarray(cut.train_images), jnp.asarray(cut.train_labels)
    eval_batches = list(train.eval_batches(jnp.asarray(cut.test_images), jnp.asarray(cut.test_labels),
                                           config.eval_batch_size))
    compiled = []
    listener = lambda event, duration, **kw: compiled.append(event)   # noqa: E731
    # A compile request counts even when the session's persistent cache (conftest.py) answers it.
    requests = lambda event, **kw: compiled.append(event)   # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.monitoring.register_event_listener(requests)
    try:
        if loop == "step":
            params, _, _ = runner(params, opt_state, images, labels, order, np.int32(0))
        else:
            params, _, _ = runner(params, opt_state, images, labels, order, np.int32(0), num_steps)
        for x, y, mask, _ in eval_batches:   # 300 + a padded 200: one shape
            train._eval_batch(params, x, y, mask, lowering.inference_config(config))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.monitoring.unregister_event_listener(requests)
    assert "/jax/core/compile/backend_compile_duration" not in compiled, compiled
    assert "/jax/compilation_cache/compile_requests_use_cache" not in compiled, compiled


def test_log_lines_of_one_scanned_epoch_share_its_rate(small):
    config = config_lib.replace(Config(), loop="scan", train_eval="running", log_every=2)
    cut = dataclasses.replace(small, train_images=small.train_images[:640], train_labels=small.train_labels[:640])
    records = []
    train.fit(config, cut, hooks=train.Hooks(on_log=records.append))
    assert [r["step"] for r in records] == list(range(2, 11, 2))
    rates = {r["images_per_second"] for r in records}
    assert len(rates) == 1 and rates.pop() > 0
