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




# Random erasing's aspect ratios h / w are log-uniform in [ERASING_RATIO, 1 / ERASING_RATIO], and it
# tries up to ERASING_ATTEMPTS rectangles per image, keeping the first that fits (timm's RandomErasing).
ERASING_RATIO = 0.3
ERASING_ATTEMPTS = 10


def erasing_boxes(key: jax.Array, n: int, height: int, width: int, probability: float, min_area: float,
                  max_area: float) -> jax.Array:
    """(n, 4) int32 rectangles (top, left, h, w) of random erasing, h = w = 0 where an image is kept:
    each image is erased with `probability`; a rectangle's area is U(min_area, max_area) of the
    image, its aspect ratio log-uniform, h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)),
    the first of `ERASING_ATTEMPTS` draws with h < height and w < width (none fits: kept), placed
    uniformly (Zhong et al. 2017, "Random Erasing Data Augmentation"; timm's RandomErasing)."""
    erase_key, area_key, ratio_key, place_key = jax.random.split(key, 4)
    shape = (n, ERASING_ATTEMPTS)
    area = jax.random.uniform(area_key, shape, minval=min_area, maxval=max_area) * (height * width)
    log_ratio = jax.random.uniform(ratio_key, shape, minval=jnp.log(ERASING_RATIO), maxval=-jnp.log(ERASING_RATIO))
    h = jnp.round(jnp.sqrt(area * jnp.exp(log_ratio))).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / jnp.exp(log_ratio))).astype(jnp.int32)
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = jnp.argmax(fits, axis=1)
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]   # noqa: E731
    erase = jax.random.bernoulli(erase_key, probability, (n,)) & jnp.any(fits, axis=1)
    h, w = jnp.where(erase, pick(h), 0), jnp.where(erase, pick(w), 0)
    u = jax.random.uniform(place_key, (n, 2))
    top = jnp.floor(u[:, 0] * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(u[:, 1] * (width - w + 1)).astype(jnp.int32)
    return jnp.stack([top, left, h, w], axis=1)


def box_masks(boxes: jax.Array, height: int, width: int) -> jax.Array:
    """(n, height, width, 1) booleans: True inside each (top, left, h, w) rectangle."""
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    top, left, h, w = (boxes[:, i, None, None] for i in range(4))
    return ((rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w))[..., None]


def random_erasing(key: jax.Array, images: jax.Array, probability: float, min_area: float = 0.02,
                   max_area: float = 1 / 3, fill: str = "random") -> jax.Array:
    """Erase one random rectangle (`erasing_boxes`) of each image with `probability`, over every
    channel: with uniform noise in [0, 1) per pixel (`fill="random"`, Zhong et al.'s) or zeros
    (`"zero"`: cutout, DeVries & Taylor 2017). Probability 0 returns the images unchanged."""
    if probability == 0:
        return images
    n, h, w, _ = images.shape
    box_key, fill_key = jax.random.split(key)
    inside = box_masks(erasing_boxes(box_key, n, h, w, probability, min_area, max_area), h, w)
    values = (jax.random.uniform(fill_key, images.shape, images.dtype) if fill == "random"
              else jnp.zeros_like(images))
    return jnp.where(inside, values, images)


def augment(key: jax.Array, images: jax.Array, max_shift: int = 0, flip: bool = False, erasing: float = 0.0,
            erasing_area: tuple[float, float] = (0.02, 1 / 3), erasing_fill: str = "random") -> jax.Array:
    """Random translation by up to `max_shift` pixels, then (if `flip`) random mirroring, then
    random erasing with probability `erasing` (its draws from fold_in(key, 1), so the translation
    and flips are those of the same key without it)."""
    translate_key, flip_key = jax.random.split(key)
    images = random_flip(flip_key, random_translate(translate_key, images, max_shift), flip)
    return random_erasing(jax.random.fold_in(key, 1), images, erasing, *erasing_area, erasing_fill)


def mix_batch(key: jax.Array, images: jax.Array, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixup or cutmix of a batch with a random permutation of itself: (images, permutation, lam),
    where example i mixes image i (weight lam) with image perm[i] (weight 1 - lam) and the loss is
    lam * CE(label_i) + (1 - lam) * CE(label_perm[i]). One lam ~ Beta(alpha, alpha) per batch;
    mixup blends the images, cutmix pastes a box of the partner's of area ~ (1 - lam) * H * W,
    lam then corrected to the unpasted fraction; with both alphas each batch takes cutmix with
    probability 1/2 (timm's Mixup, mode "batch", correct_lam; Zhang et al. 2018, "mixup"; Yun et
    al. 2019, "CutMix"). timm pairs with the reversed batch; here a permutation."""
    perm_key, mix_key, cut_key, box_key, switch_key = jax.random.split(key, 5)
    n, h, w, _ = images.shape
    perm = jax.random.permutation(perm_key, n)
    partner = jnp.take(images, perm, axis=0)
    mixed, lam = images, jnp.ones((), images.dtype)
    if mixup_alpha:
        lam = jax.random.beta(mix_key, mixup_alpha, mixup_alpha).astype(images.dtype)
        mixed = lam * images + (1.0 - lam) * partner
    if cutmix_alpha:
        cut_lam = jax.random.beta(cut_key, cutmix_alpha, cutmix_alpha)
        ratio = jnp.sqrt(1.0 - cut_lam)
        cut_h, cut_w = (jnp.floor(h * ratio).astype(jnp.int32), jnp.floor(w * ratio).astype(jnp.int32))
        cy, cx = jax.random.randint(box_key, (2,), 0, jnp.array([h, w]))
        top, bottom = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
        left, right = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
        box = jnp.stack([top, left, bottom - top, right - left])[None]
        cut = jnp.where(box_masks(box, h, w), partner, images)
        cut_lam = (1.0 - (bottom - top) * (right - left) / (h * w)).astype(images.dtype)
        if mixup_alpha:
            use_cut = jax.random.bernoulli(switch_key, 0.5)
            mixed, lam = jnp.where(use_cut, cut, mixed), jnp.where(use_cut, cut_lam, lam)
        else:
            mixed, lam = cut, cut_lam
    return mixed, perm, lam
