"""Augmentation: exact shifts and mirrors, per example, deterministic in the key, inside jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.data import augment

N, H, W, C = 16, 8, 7, 3


def batch():
    """Distinct images (every pixel of every example differs), so each output can be traced back."""
    return jnp.asarray(np.arange(N * H * W * C, dtype=np.float32).reshape(N, H, W, C) + 1)


def shifted(image, dy, dx):
    """`image` moved down by dy and right by dx, zeros where it came from outside (numpy)."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def which_shift(out, image, s):
    matches = [(dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)
               if np.array_equal(out, shifted(image, dy, dx))]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.mark.parametrize("s", [1, 3])
def test_translation_shifts_each_example_by_its_own_offset(s):
    images = batch()
    out = np.asarray(jax.jit(augment.random_translate, static_argnums=2)(jax.random.key(0), images, s))
    shifts = [which_shift(out[i], np.asarray(images[i]), s) for i in range(N)]   # example i from example i
    assert len(set(shifts)) > 1 and all(max(abs(dy), abs(dx)) <= s for dy, dx in shifts)


def test_flip_mirrors_some_examples_and_keeps_the_others():
    images = batch()
    out = np.asarray(jax.jit(augment.random_flip)(jax.random.key(1), images))
    mirrored = [np.array_equal(out[i], np.asarray(images[i])[:, ::-1]) for i in range(N)]
    kept = [np.array_equal(out[i], np.asarray(images[i])) for i in range(N)]
    assert all(m != k for m, k in zip(mirrored, kept))   # each example: exactly one of the two
    assert 0 < sum(mirrored) < N


def test_same_key_same_result_other_key_other_result():
    images = batch()
    run = jax.jit(functools.partial(augment.augment, max_shift=2, flip=True))
    a, b = run(jax.random.key(5), images), run(jax.random.key(5), images)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(jax.random.key(6), images))


def test_off_is_identity():
    images = batch()
    key = jax.random.key(3)
    assert augment.random_translate(key, images, 0) is images
    assert augment.random_flip(key, images, enabled=False) is images
    np.testing.assert_array_equal(jax.jit(lambda k, x: augment.augment(k, x, 0, False))(key, images), images)


def test_labels_stay_aligned_with_their_images():
    """A jitted step that augments the images and passes the labels through: after both, image i
    is still a shifted or mirrored copy of input i, whose label is labels[i]."""
    images, labels = batch(), jnp.arange(N) % 10

    @jax.jit
    def step(key, images, labels):
        return augment.augment(key, images, max_shift=1, flip=True), labels

    out, out_labels = step(jax.random.key(7), images, labels)
    np.testing.assert_array_equal(out_labels, labels)
    out = np.asarray(out)
    for i in range(N):
        image = np.asarray(images[i])
        candidates = [shifted(im, dy, dx) for im in (image, image[:, ::-1])
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(np.array_equal(out[i], c) for c in candidates), i


def test_runs_on_device_without_host_copies():
    images = jax.device_put(batch())
    key = jax.device_put(jax.random.key(0))
    run = jax.jit(functools.partial(augment.augment, max_shift=2, flip=True))
    run(key, images).block_until_ready()   # compile outside the guard
    with jax.transfer_guard("disallow"):
        out = run(key, images)
    assert out.shape == images.shape and out.dtype == images.dtype
