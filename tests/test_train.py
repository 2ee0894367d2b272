"""The training loop: determinism, real-data learning, strategy equivalence, the moving loss, compile ahead."""

import dataclasses

import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.data import sources as data
from cnn_jax.engine import evaluation, state, train
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
    s1, h1 = train.fit(config, cut)
    s2, h2 = train.fit(config, cut)
    assert leaves_equal(s1, s2)
    assert h1[0]["moving_loss"] == h2[0]["moving_loss"]
    s3, _ = train.fit(config_lib.replace(config, seed=1), cut)
    assert not leaves_equal(s1.params, s3.params)


def test_short_real_run_learns(small):
    config = config_lib.replace(Config(), epochs=2)
    params0, model_state = model.init(jax.random.key(config.seed), config)
    before = evaluation.evaluate(params0, model_state, jnp.asarray(small.test_images),
                                 jnp.asarray(small.test_labels), config)
    final, history = train.fit(config, small)
    assert int(final.step) == 2 * 32
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
    numerics.assert_updates_close(results[1][0].params, results[0][0].params,
                                  model.init(jax.random.key(base.seed), base)[0], what="scan against step")
    assert abs(results[0][1][0]["moving_loss"] - results[1][1][0]["moving_loss"]) < 1e-4


def test_moving_average_is_the_tutorials():
    assert train.moving_average(np.array([2.0, 1.0]), 0.01) == pytest.approx(0.99 * 2.0 + 0.01 * 1.0)
    assert train.moving_average(np.array([1.0]), 0.5, start=3.0) == pytest.approx(2.0)


def test_an_epoch_record_holds_each_held_out_split_and_the_epoch_sums_restart():
    log = train.RunLog()
    records, diverged = log.absorb(np.array([1.0, 0.5]), np.array([3, 4]), np.array([True, True]), 0,
                                   config_lib.replace(Config(), log_every=2), 100.0)
    assert diverged is None and [r["loss"] for r in records] == [0.75]
    record = log.finish_epoch(0, log.running_train_eval(2, 4), {"test": {"loss": 0.3, "accuracy": 0.9},
                                                                "validation": {"loss": 0.4, "accuracy": 0.8}}, 2.0, 8)
    assert (record["train_loss"], record["train_accuracy"]) == (0.75, 7 / 8)
    assert (record["test_loss"], record["test_accuracy"], record["validation_loss"], record["validation_accuracy"]) \
        == (0.3, 0.9, 0.4, 0.8)
    assert record["images_per_second"] == 4.0 and log.history == [record]
    assert (log.epoch_losses, log.epoch_correct, log.step) == ([], 0, 2)
    only_validation = log.finish_epoch(1, {"loss": 0.1, "accuracy": 1.0},
                                       {"validation": {"loss": 0.2, "accuracy": 0.7}}, 1.0, 8)
    assert "test_accuracy" not in only_validation and only_validation["validation_accuracy"] == 0.7


def test_format_epoch_is_the_tutorials_line():
    line = train.format_epoch({"epoch": 0, "moving_loss": 0.1712, "train_accuracy": 0.9651,
                               "test_accuracy": 0.9628, "epoch_time": 19.83, "images_per_second": 3030.4})
    assert line == "Epoch 0. Loss: 0.1712, Train_acc 0.9651, Test_acc 0.9628, 19.8 s, 3030 img/s"


@pytest.mark.parametrize("loop", ["step", "scan"])
def test_compile_ahead_leaves_nothing_to_compile_for_fit(small, loop):
    config = config_lib.replace(Config(), loop=loop, eval_batch_size=300, seed=7)
    cut = dataclasses.replace(small, train_images=small.train_images[:320], train_labels=small.train_labels[:320],
                              test_images=small.test_images[:500], test_labels=small.test_labels[:500])
    num_steps = train.steps_per_epoch(config, len(cut.train_labels))
    optimizer, runner = train.compiled_runner(config, num_steps * config.epochs, loop)
    whole_epochs, evals = train.compile_ahead(config, cut, optimizer, runner, loop, num_steps)
    runner = train.whole_epoch_runner(runner, whole_epochs, num_steps)
    start = state.create(config, optimizer)
    order = jnp.asarray(data.epoch_permutation(config.seed, 0, len(cut.train_labels)))
    images, labels = jnp.asarray(cut.train_images), jnp.asarray(cut.train_labels)
    eval_batches = list(evaluation.eval_batches(jnp.asarray(cut.test_images), jnp.asarray(cut.test_labels),
                                           config.eval_batch_size))
    compiled = []
    listener = lambda event, duration, **kw: compiled.append(event)   # noqa: E731
    # A compile request counts even when the session's persistent cache (conftest.py) answers it.
    requests = lambda event, **kw: compiled.append(event)   # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.monitoring.register_event_listener(requests)
    try:
        if loop == "step":
            final, _ = runner(start, images, labels, order, np.int32(0))
        else:
            final, _ = runner(start, images, labels, order, np.int32(0), num_steps)
        for x, y, mask, _ in eval_batches:   # 300 + a padded 200: one shape
            evals[x.shape](final.params, final.model_state, x, y, mask)
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


def test_start_hook_gives_the_start_and_on_finish_gets_the_end(small):
    """`hooks.start` sees the prepared session and may hand back a (state, log) to continue (a
    workdir's restored checkpoint); `on_finish` gets the final state and the history."""
    config = config_lib.replace(Config(), train_eval="running", loop="step", epochs=2)
    cut = dataclasses.replace(small, train_images=small.train_images[:640], train_labels=small.train_labels[:640])
    saved = []

    def stop_after_first_epoch(state, log, record):
        saved.append((jax.device_get(state), dataclasses.replace(log, history=list(log.history))))

    whole, history = train.fit(config, cut, hooks=train.Hooks(on_epoch=stop_after_first_epoch))
    seen, finished = [], []

    def start(session):
        seen.append(session)
        return saved[0]

    resumed, resumed_history = train.fit(config, cut, hooks=train.Hooks(
        start=start, on_finish=lambda session, state, history: finished.append((session, state, history))))
    assert len(seen) == 1 and seen[0].steps_per_epoch == 10 and seen[0].config == config
    assert int(resumed.step) == 20 and leaves_equal(resumed.params, whole.params)
    assert [r["test_accuracy"] for r in resumed_history] == [r["test_accuracy"] for r in history]
    (session, state, finished_history), = finished
    assert session is seen[0] and state is resumed and finished_history == resumed_history
