"""Data augmentation as pure functions of (key, images), for use inside a jitted train step.

Images are a batch (N, H, W, C) already on the device; every function returns a batch of
the same shape and dtype, example i transformed from example i (so labels stay aligned),
with no host copies. The same key gives the same result; a setting that is off returns the
images unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def random_translate(key: jax.Array, images: jax.Array, max_shift: int) -> jax.Array:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift]^2, filling with
    zeros: pad every side by `max_shift`, then crop an H x W window at a random offset."""
    if max_shift == 0:
        return images
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
    crop = lambda image, offset: lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array, enabled: bool = True) -> jax.Array:
    """Mirror each image left-right with probability 1/2 (only where mirroring keeps the label:
    `DatasetSpec.flip_keeps_label`)."""
    if not enabled:
        return images
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def augment(key: jax.Array, images: jax.Array, max_shift: int = 0, flip: bool = False) -> jax.Array:
    """Random translation by up to `max_shift` pixels, then (if `flip`) random mirroring."""
    translate_key, flip_key = jax.random.split(key)
    return random_flip(flip_key, random_translate(translate_key, images, max_shift), flip)
