"""The model registry (cnn_jax/models/__init__.py, cnn_jax/model.py) is open: a family defined in
this file, with a stateful layer (a running mean) and a random one (dropout), registered by
name, trains through `fit`, a vmapped sweep group and the command line with --workdir, and
resumes bit-exactly after an interruption.

This module is itself the family "tiny" (the five functions below); the command-line test finds
it through $CNN_JAX_MODELS=tiny=test_models with this folder on PYTHONPATH.
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model, models, sweep
from cnn_jax.config import Config, ConfigError
from cnn_jax.engine import optim, state, train
from cnn_jax.nn import layers, lowering
import family_checks
from conftest import REPO_ROOT

# --------------------------------------------------------------------------- the family "tiny"

WIDTH = 4          # conv1's filters
MOMENTUM = 0.9     # of the running mean
DROP = 0.25        # dropout rate before the classifier


def _shapes(config):
    h, w, _ = config.input_shape
    conv = (h - 2, w - 2, WIDTH)
    pool = (conv[0] // 2, conv[1] // 2, WIDTH)
    return conv, pool, pool[0] * pool[1] * WIDTH


def init(key, config):
    """conv1 (3x3, no bias: the centring removes it) and an output layer; the model state is
    conv1's running channel mean."""
    _, _, flat = _shapes(config)
    k1, k2 = jax.random.split(key)
    channels = config.input_shape[2]
    params = {"conv1": {"w": jax.random.normal(k1, (3, 3, channels, WIDTH)) * np.sqrt(2 / (9 * channels))},
              "output": {"w": jax.random.normal(k2, (flat, config.num_classes)) * np.sqrt(1 / flat),
                         "b": jnp.zeros(config.num_classes)}}
    return params, {"centre": {"mean": jnp.zeros(WIDTH)}}


def apply(params, model_state, images, config, *, train, rng):
    """conv1 -> centre (batch mean in training, running mean otherwise) -> relu -> 2x2 average
    pool -> dropout (training only) -> output."""
    x = layers.conv2d(images, params["conv1"]["w"], jnp.zeros(WIDTH))
    if train:
        mean = jnp.mean(x, axis=(0, 1, 2))
        model_state = {"centre": {"mean": MOMENTUM * model_state["centre"]["mean"]
                                  + (1 - MOMENTUM) * jax.lax.stop_gradient(mean)}}
    else:
        mean = model_state["centre"]["mean"]
    x = layers.relu(x - mean)
    x = layers.flatten(layers.POOLS["avg"](x, 2, 2))
    if train:
        keep = jax.random.bernoulli(rng, 1 - DROP, x.shape)
        x = jnp.where(keep, x / (1 - DROP), 0.0)
    return layers.dense(x, params["output"]["w"], params["output"]["b"]), model_state


def walk(config):
    conv, pool, flat = _shapes(config)
    conv_flops = 2.0 * conv[0] * conv[1] * 9 * config.input_shape[2] * WIDTH
    return [("conv1", conv, conv_flops), ("pool1", pool, 0.0), ("flatten", (flat,), 0.0),
            ("output", (config.num_classes,), 2.0 * flat * config.num_classes)]


def validate(config):
    if min(config.input_shape[:2]) < 4:
        raise ConfigError(f"--model=tiny needs inputs of at least 4x4, got {config.input_shape}")


# --------------------------------------------------------------------------- tests

TINY = config_lib.replace(Config(), model="tiny", epochs=2, batch_size=32, log_every=5, loop="step",
                          train_eval="running", eval_batch_size=100)


@pytest.fixture(scope="module", autouse=True)
def tiny_family():
    """The family of this file, selectable while its tests run (and not in other files' tests)."""
    models.register("tiny", __name__)
    yield
    models.unregister("tiny")


@pytest.fixture(scope="module")
def small(mnist):
    """320 real training images (10 steps of 32) and 200 real test images."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:320], train_labels=mnist.train_labels[:320],
                               test_images=mnist.test_images[:200], test_labels=mnist.test_labels[:200])


def strip(records):
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_second")} for r in records]


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_a_registered_family_is_selectable_and_checked(monkeypatch):
    assert models.names()[0] == "cnn" and "tiny" in models.names()
    config = model.validate(TINY)
    assert model.layer_shapes(config)[-1] == ("output", (10,))
    assert model.format_layer_shapes(config).splitlines()[0] == "conv1    26x26x4"
    with pytest.raises(ConfigError, match="--model=tiny needs inputs of at least 4x4"):
        model.validate(config_lib.replace(TINY, input_shape=(3, 3, 1)))
    with pytest.raises(ConfigError, match=r"--model='nonet' is not allowed: use one of cnn, .*tiny"):
        model.validate(config_lib.replace(TINY, model="nonet"))
    # $CNN_JAX_MODELS names families for the scripts.
    monkeypatch.setenv(models.PLUGINS_ENV, "other=test_models")
    assert models.family(config_lib.replace(TINY, model="other").model) is sys.modules[__name__]
    monkeypatch.setenv(models.PLUGINS_ENV, "other")
    with pytest.raises(ValueError, match="not name=module"):
        models.names()


def test_apply_uses_the_state_in_evaluation_and_the_rng_in_training():
    params, model_state = model.init(jax.random.key(0), TINY)
    images = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
    eval_logits, same_state = model.apply(params, model_state, images, TINY)
    assert same_state is model_state
    a, new_state = model.apply(params, model_state, images, TINY, train=True, rng=jax.random.key(2))
    b, _ = model.apply(params, model_state, images, TINY, train=True, rng=jax.random.key(2))
    c, _ = model.apply(params, model_state, images, TINY, train=True, rng=jax.random.key(3))
    np.testing.assert_array_equal(a, b)             # the same key, the same dropout mask
    assert not np.array_equal(a, c) and not np.array_equal(a, eval_logits)
    assert np.all(np.asarray(new_state["centre"]["mean"]) != 0)
    np.testing.assert_array_equal(model.first_conv(params, TINY), params["conv1"]["w"])   # the default
    # Without its own `inference_config`, a family evaluates with `lowering.inference_config`'s.
    assert model.inference_config(TINY) == lowering.inference_config(TINY)
    assert model.inference_config(TINY).conv_impl == "lax"


def test_fit_trains_it_and_a_mid_epoch_stop_resumes_bit_exactly(small):
    saved = []

    def on_stop(s, log):
        saved.append((jax.device_get(s), dataclasses.replace(log, epoch_losses=list(log.epoch_losses))))

    whole, history = train.fit(TINY, small)
    assert history[-1]["test_accuracy"] > 0.35 and int(whole.step) == 20   # 0.495; chance is 0.1
    assert np.all(np.asarray(whole.model_state["centre"]["mean"]) != 0)   # the running mean moved
    with pytest.raises(train.Stopped):
        train.fit(TINY, small, hooks=train.Hooks(should_stop=lambda step: step == 13, on_stop=on_stop))
    resumed, resumed_history = train.fit(TINY, small, start=saved[0])
    assert leaves_equal(resumed, whole)             # params, optimiser and model state, rng, step
    assert strip(resumed_history) == strip(history)
    # Another seed: other init, data order and dropout masks.
    other, _ = train.fit(config_lib.replace(TINY, seed=1), small)
    assert not np.array_equal(other.rng, whole.rng) and not leaves_equal(other.params, whole.params)


def test_dropout_depends_on_the_step_not_on_how_steps_are_grouped(small):
    """fold_in(rng, step): a scanned epoch draws the masks one call per batch draws."""
    step_run, _ = train.fit(TINY, small)
    scan_run, _ = train.fit(config_lib.replace(TINY, loop="scan"), small)
    for a, b in zip(jax.tree.leaves(step_run), jax.tree.leaves(scan_run)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)   # XLA may fuse a scan's sums differently
    # The same init and data order with another stream of dropout masks ends elsewhere.
    fresh = state.create(TINY, optim.make_optimizer(TINY, 20))
    other_masks = fresh.replace(rng=state.run_rng(config_lib.replace(TINY, seed=5)))
    shifted, _ = train.fit(TINY, small, start=(other_masks, train.RunLog()))
    assert not np.allclose(shifted.params["output"]["w"], step_run.params["output"]["w"], atol=1e-3)


def test_a_vmapped_sweep_group_trains_each_run_as_alone(small):
    configs = [config_lib.replace(TINY, seed=0, learning_rate=0.003),
               config_lib.replace(TINY, seed=1, learning_rate=0.001)]
    result = sweep.train_group(configs, small)
    assert result.diverged == [None, None]
    for i, config in enumerate(configs):
        alone, history = train.fit(config, small)
        mine = state.unstack(result.state, i)
        for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(alone)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose([h["moving_loss"] for h in result.histories[i]],
                                   [h["moving_loss"] for h in history], rtol=1e-5)
    assert not np.allclose(result.state.model_state["centre"]["mean"][0],
                           result.state.model_state["centre"]["mean"][1])   # each run its own state
    assert float(result.state.opt_state.hyperparams["learning_rate"][1]) == np.float32(0.001)


def _cli(mnist_dir, workdir, *extra):
    return [sys.executable, os.path.join(REPO_ROOT, "experiments", "train.py"), "--model=tiny",
            f"--data_dir={mnist_dir}", "--train_subset=640", "--test_subset=200", "--batch_size=32",
            "--epochs=2", "--loop=step", "--log_every=2", "--train_eval=running", f"--workdir={workdir}", *extra]


@pytest.mark.slow
def test_the_command_line_trains_and_resumes_it_bit_exactly(mnist_dir, tmp_path):
    env = dict(os.environ, CNN_JAX_MODELS="tiny=test_models",
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.path.join(REPO_ROOT, "tests")]))
    # SIGTERM in the second epoch: a checkpoint of the current step, then --resume to the end.
    out, (want, want_meta), (got, got_meta), stopped = family_checks.interrupted_and_resumed(
        lambda workdir, *extra: _cli(mnist_dir, workdir, *extra), str(tmp_path / "reference"),
        str(tmp_path / "interrupted"), env, "(epoch 1, 4/20)")
    assert "Epoch 1." in out
    assert 20 < stopped < 40
    assert int(got.step) == 40 and leaves_equal(got, want)
    assert got_meta["history"][-1]["test_accuracy"] == want_meta["history"][-1]["test_accuracy"]
    assert np.all(np.asarray(got.model_state["centre"]["mean"]) != 0)
