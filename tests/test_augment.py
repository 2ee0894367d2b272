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


@pytest.mark.parametrize("fill", ["random", "zero"])
def test_random_erasing_erases_one_rectangle_of_the_drawn_area_with_its_fill(fill):
    """Random erasing (Zhong et al. 2017): an image is erased with probability p, in exactly the
    rectangle `erasing_boxes` draws (over every channel), of area within [min, max] of the image up
    to rounding and smaller than the image; the rest is untouched; the fill is noise in [0, 1) or 0."""
    n, h, w, p = 400, 20, 16, 0.6
    images = jnp.full((n, h, w, 2), 5.0)   # outside [0, 1): an erased pixel never equals it
    key = jax.random.key(7)
    out = np.asarray(jax.jit(functools.partial(augment.random_erasing, probability=p, min_area=0.05,
                                               max_area=0.3, fill=fill))(key, images))
    boxes = np.asarray(augment.erasing_boxes(jax.random.split(key)[0], n, h, w, p, 0.05, 0.3))
    erased = out != 5.0
    for i, (top, left, bh, bw) in enumerate(boxes):
        inside = np.zeros((h, w), bool)
        inside[top:top + bh, left:left + bw] = True
        np.testing.assert_array_equal(erased[i], np.repeat(inside[..., None], 2, -1))
        if bh:
            assert bh < h and bw < w and top + bh <= h and left + bw <= w
            # h, w are sqrt(area * r), sqrt(area / r) rounded: the area within rounding of the range.
            assert (np.sqrt(0.05 * h * w) - 0.5) ** 2 - 1e-6 <= bh * bw <= (np.sqrt(0.3 * h * w) + 0.5) ** 2 + 1e-6
            assert 0.3 - 0.1 <= bh / bw <= 1 / 0.3 + 1.2   # the aspect ratio range, up to rounding
    assert abs((boxes[:, 2] > 0).mean() - p) < 0.08
    values = out[erased]
    if fill == "zero":
        assert np.all(values == 0)
    else:
        assert np.all((values >= 0) & (values < 1)) and len(np.unique(values)) > 0.9 * len(values)
    np.testing.assert_array_equal(augment.random_erasing(key, images, 0.0), images)


def test_augment_with_erasing_keeps_the_same_keys_shifts_and_flips():
    images, key = batch(), jax.random.key(3)
    plain = augment.augment(key, images, 2, True)
    erased = augment.augment(key, images, 2, True, erasing=1.0, erasing_area=(0.1, 0.3), erasing_fill="zero")
    changed = np.asarray(plain != erased)
    assert changed.any() and np.all(np.asarray(erased)[changed] == 0)


def test_mixup_pairs_each_example_with_its_permuted_partner_at_one_beta_weight():
    """Mixup (Zhang et al. 2018; timm's Mixup): output i = lam * image i + (1 - lam) * image perm[i],
    perm a permutation of the batch, lam ~ Beta(alpha, alpha): its mean over batches is 1/2 and its
    variance 1 / (4 (2 alpha + 1))."""
    images = batch()
    mixed, perm, lam = augment.mix_batch(jax.random.key(0), images, mixup_alpha=0.4)
    assert sorted(np.asarray(perm).tolist()) == list(range(N)) and not np.array_equal(perm, np.arange(N))
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[np.asarray(perm)], rtol=1e-6)
    lams = np.asarray(jax.vmap(lambda k: augment.mix_batch(k, images, mixup_alpha=0.4)[2])(
        jax.random.split(jax.random.key(1), 4000)), np.float64)
    assert np.all((lams >= 0) & (lams <= 1))
    assert abs(lams.mean() - 0.5) < 0.02 and abs(lams.var() - 1 / (4 * (2 * 0.4 + 1))) < 0.01


def test_cutmix_pastes_one_box_of_the_partner_and_weighs_by_the_unpasted_area():
    """CutMix (Yun et al. 2019; timm's cutmix_bbox_and_lam with correct_lam): one box of the partner
    image perm[i] pasted into every image i, lam = 1 - box area / image area; with both alphas each
    batch is either a blend or a box, about half of each."""
    images = np.asarray(batch())
    areas = []
    for seed in range(20):
        mixed, perm, lam = (np.asarray(a) for a in augment.mix_batch(jax.random.key(seed), images, cutmix_alpha=1.0))
        moved = perm != np.arange(N)   # an image paired with itself stays as it is
        assert np.all((mixed == images[perm]) | (mixed == images))
        pasted = mixed != images
        box = pasted[np.argmax(moved), :, :, 0]
        assert np.all(pasted == (box[None, :, :, None] & moved[:, None, None, None]))
        rows, cols = np.nonzero(box)
        area = len(rows)
        if area:   # a rectangle
            assert area == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        np.testing.assert_allclose(lam, 1 - area / (H * W), rtol=1e-6)
        areas.append(area)
    assert len(set(areas)) > 5
    kinds = []
    for seed in range(40):
        mixed, perm, lam = augment.mix_batch(jax.random.key(seed), images, mixup_alpha=1.0, cutmix_alpha=1.0)
        kinds.append(bool(np.all((mixed == images) | (mixed == images[np.asarray(perm)]))))
    assert 10 < sum(kinds) < 30
