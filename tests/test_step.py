"""The train step: pure, the manual update, the divergence flag, the model state and rng it carries."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.nn import layers
from cnn_jax.engine import optim, state, step
from cnn_jax.config import Config


@pytest.fixture(scope="module")
def small(mnist):
    """64 real training images."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:64], train_labels=mnist.train_labels[:64])


def test_train_step_is_pure_and_matches_a_manual_update(small):
    config = config_lib.replace(config_lib.PRESETS["tutorial"])
    opt = optim.make_optimizer(config, 1)
    start = state.create(config, opt)
    params = start.params
    images, labels = jnp.asarray(small.train_images[:64]), jnp.asarray(small.train_labels[:64])
    new, metrics = jax.jit(step.make_train_step(config, opt))(start, (images, labels))
    grads = jax.jit(jax.grad(lambda p: step.loss_fn(p, {}, (images, labels), None, config)[0]))(params)
    for p, g, n in zip(jax.tree.leaves(params), jax.tree.leaves(grads), jax.tree.leaves(new.params)):
        np.testing.assert_allclose(n, p - 0.01 * g, rtol=1e-5, atol=1e-7)
    assert int(new.step) == 1 and np.array_equal(new.rng, start.rng)
    assert 2.0 < float(metrics["loss"]) < 2.6  # ~log(10) at a near-zero init


def test_an_overflowing_optimiser_state_is_divergence_at_its_step(small):
    """Adam at lr 1e6: the params stay finite but the squared-gradient state overflows, which no
    checkpoint could hold; the step's `finite` flag reports it (tests/test_sweep.py trains into it)."""
    config = config_lib.replace(Config(), conv_filters=(4,), conv_kernels=(3,), num_fc=16, learning_rate=1e6)
    optimizer = optim.make_optimizer(config, 10)
    start = state.create(config, optimizer)
    inner = start.opt_state.inner_state
    adam = inner[0]
    poisoned = start.replace(opt_state=start.opt_state._replace(inner_state=(
        adam._replace(nu=jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), adam.nu)), *inner[1:])))
    train_step = jax.jit(step.make_train_step(config, optimizer))
    batch = jnp.asarray(small.train_images[:32]), jnp.asarray(small.train_labels[:32])
    assert bool(train_step(start, batch)[1]["finite"])
    new, metrics = train_step(poisoned, batch)
    assert not bool(metrics["finite"])
    assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(new.params))   # the params alone look fine


def test_the_step_augments_its_batch_from_the_step_key(small):
    """With --augment_shift / --augment_flip the step trains on the batch augmented with
    fold_in(step key, AUGMENT_STREAM): the same update as the manual one on those images, and not
    the update on the raw images; the same state gives the same augmentation."""
    from cnn_jax.data import augment
    config = config_lib.replace(config_lib.PRESETS["tutorial"], augment_shift=3, augment_flip=True)
    opt = optim.make_optimizer(config, 1)
    start = state.create(config, opt).replace(step=jnp.asarray(7, jnp.int32))
    images, labels = jnp.asarray(small.train_images[:64]), jnp.asarray(small.train_labels[:64])
    train_step = jax.jit(step.make_train_step(config, opt))
    new, _ = train_step(start, (images, labels))
    again, _ = train_step(start, (images, labels))
    seen = augment.augment(jax.random.fold_in(state.step_rng(start), step.AUGMENT_STREAM), images, 3, True)
    assert not np.array_equal(seen, images)
    grad_fn = jax.jit(jax.grad(lambda p, x: step.loss_fn(p, {}, (x, labels), None, config)[0]))
    for name, batch_images in (("augmented", seen), ("raw", images)):
        grads = grad_fn(start.params, batch_images)
        expected = jax.tree.map(lambda p, g: p - 0.01 * g, start.params, grads)
        close = all(np.allclose(n, e, rtol=1e-5, atol=1e-7)
                    for n, e in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)))
        assert close == (name == "augmented"), name
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(again)))


def test_augmentation_is_checked_against_the_image_size():
    with pytest.raises(config_lib.ConfigError, match="--augment_shift=28 is not allowed"):
        model.validate(config_lib.replace(Config(), augment_shift=28))
    with pytest.raises(config_lib.ConfigError, match="--augment_shift=-1 is not allowed"):
        model.validate(config_lib.replace(Config(), augment_shift=-1))


def test_label_smoothing_trains_on_its_formula_and_evaluation_keeps_the_plain_loss(small):
    """--label_smoothing e: the training loss is (1 - e) * CE + e * mean_k(-log p_k) per example;
    evaluation's loss stays the plain cross-entropy."""
    config = config_lib.replace(Config(), label_smoothing=0.2)
    params, model_state = model.init(jax.random.key(0), config)
    images, labels = jnp.asarray(small.train_images[:32]), jnp.asarray(small.train_labels[:32])
    loss, (metrics, _) = step.loss_fn(params, model_state, (images, labels), None, config)
    logits, _ = model.apply(params, model_state, images, config, train=True)
    log_p = np.asarray(jax.nn.log_softmax(logits), np.float64)
    nll = -log_p[np.arange(32), np.asarray(labels)]
    np.testing.assert_allclose(loss, np.mean(0.8 * nll + 0.2 * -log_p.mean(-1)), rtol=1e-5)
    plain, _ = step.loss_fn(params, model_state, (images, labels), None, config_lib.replace(config, label_smoothing=0.0))
    assert float(loss) > float(plain)
    summed, _, _ = step.eval_batch(params, model_state, images, labels, jnp.ones(32, bool), config)
    np.testing.assert_allclose(summed, nll.sum(), rtol=1e-5)
    for bad in (-0.1, 1.5):
        with pytest.raises(config_lib.ConfigError, match=rf"^--label_smoothing={bad} is not allowed: it must be in \[0, 1\]"):
            model.validate(config_lib.replace(Config(), label_smoothing=bad))


def test_mixup_in_the_step_trains_on_the_mixed_batch_with_the_weighted_pair_of_losses(small):
    """--mixup_alpha / --cutmix_alpha: the step's update is the manual one on augment.mix_batch's
    images from fold_in(step key, MIX_STREAM) with the loss lam * CE(label) + (1 - lam) * CE(partner's)."""
    from cnn_jax.data import augment
    for alphas in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}):
        config = config_lib.replace(config_lib.PRESETS["tutorial"], **alphas)
        opt = optim.make_optimizer(config, 1)
        start = state.create(config, opt).replace(step=jnp.asarray(5, jnp.int32))
        images, labels = jnp.asarray(small.train_images[:64]), jnp.asarray(small.train_labels[:64])
        new, _ = jax.jit(step.make_train_step(config, opt))(start, (images, labels))
        mixed, perm, lam = augment.mix_batch(jax.random.fold_in(state.step_rng(start), step.MIX_STREAM), images,
                                             config.mixup_alpha, config.cutmix_alpha)
        assert 0 < float(lam) < 1

        def manual(p):
            logits, _ = model.apply(p, {}, mixed, config, train=True)
            return jnp.sum(lam * layers.softmax_cross_entropy(logits, labels)
                           + (1 - lam) * layers.softmax_cross_entropy(logits, labels[perm]))

        grads = jax.jit(jax.grad(manual))(start.params)
        for p, g, n in zip(jax.tree.leaves(start.params), jax.tree.leaves(grads), jax.tree.leaves(new.params)):
            np.testing.assert_allclose(n, p - 0.01 * g, rtol=1e-4, atol=1e-6)


def test_flip_averaging_evaluates_the_mean_logits_of_the_image_and_its_mirror(small):
    """--tta_flip: eval_batch's logits are (f(x) + f(mirror x)) / 2, its loss and accuracy theirs."""
    config = config_lib.replace(Config(), tta_flip=True)
    plain = config_lib.replace(config, tta_flip=False)
    params, model_state = model.init(jax.random.key(0), config)
    images, labels = jnp.asarray(small.train_images[:32]), jnp.asarray(small.train_labels[:32])
    mask = jnp.arange(32) < 30
    loss, correct, logits = step.eval_batch(params, model_state, images, labels, mask, config)
    straight = step.eval_batch(params, model_state, images, labels, mask, plain)[2]
    mirrored = step.eval_batch(params, model_state, images[:, :, ::-1, :], labels, mask, plain)[2]
    np.testing.assert_allclose(logits, (straight + mirrored) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(logits, straight)
    want = (straight + mirrored) / 2
    np.testing.assert_allclose(loss, jnp.sum(layers.softmax_cross_entropy(want, labels) * mask), rtol=1e-5)
    assert int(correct) == int(jnp.sum((jnp.argmax(want, -1) == labels) * mask))
