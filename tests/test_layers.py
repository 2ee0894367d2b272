"""Layers against NumPy references, gradients against finite differences, shape properties."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn_jax.nn import layers



def np_conv(x, w, b, stride, padding):
    """Direct-loop NHWC/HWIO convolution in float64."""
    kh, kw, _, o = w.shape
    n, h, wd, c = x.shape
    if padding == "SAME":
        ph = layers.same_padding(h, kh, stride)
        pw = layers.same_padding(wd, kw, stride)
        x = np.pad(x, ((0, 0), ph, pw, (0, 0)))
    oh = layers.conv_output_size(h, kh, stride, padding)
    ow = layers.conv_output_size(wd, kw, stride, padding)
    out = np.zeros((n, oh, ow, o))
    for i, j in itertools.product(range(oh), range(ow)):
        patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
        out[:, i, j, :] = np.tensordot(patch, w, axes=([1, 2, 3], [0, 1, 2]))
    return out + b


def np_pool(x, window, stride, reduce):
    n, h, w, c = x.shape
    oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
    out = np.zeros((n, oh, ow, c))
    for i, j in itertools.product(range(oh), range(ow)):
        out[:, i, j, :] = reduce(x[:, i * stride:i * stride + window, j * stride:j * stride + window, :], axis=(1, 2))
    return out


def random(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


CONV_CASES = [  # (input NHWC, kernel, out channels, stride, padding)
    ((2, 28, 28, 1), 3, 20, 1, "VALID"),
    ((2, 13, 13, 20), 5, 50, 1, "VALID"),
    ((3, 9, 7, 2), 3, 4, 2, "VALID"),
    ((2, 8, 8, 3), 3, 5, 1, "SAME"),
    ((1, 10, 9, 2), 4, 3, 3, "SAME"),
]


@pytest.mark.parametrize("conv", [layers.conv2d, layers.conv2d_patches], ids=["lax", "patches"])
@pytest.mark.parametrize("shape,k,o,stride,padding", CONV_CASES)
def test_conv_matches_numpy(conv, shape, k, o, stride, padding):
    x, w, b = random(shape, 0), random((k, k, shape[3], o), 1), random((o,), 2)
    got = conv(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), stride, padding)
    np.testing.assert_allclose(got, np_conv(x, w, b, stride, padding), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,k,o,stride,padding", CONV_CASES)
def test_conv_patches_gradient_equals_reference(shape, k, o, stride, padding):
    x, w, b = random(shape, 3), random((k, k, shape[3], o), 4), random((o,), 5)
    cot = random((shape[0], layers.conv_output_size(shape[1], k, stride, padding),
                  layers.conv_output_size(shape[2], k, stride, padding), o), 6)

    def grads(conv):
        return jax.grad(lambda x, w, b: jnp.sum(conv(x, w, b, stride, padding) * cot), argnums=(0, 1, 2))(x, w, b)

    for ref, fast in zip(grads(layers.conv2d), grads(layers.conv2d_patches)):
        np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window,stride", [(2, 2), (3, 2), (2, 1), (3, 3)])
def test_pools_match_numpy(window, stride):
    x = random((2, 9, 8, 3), 7)
    np.testing.assert_allclose(layers.max_pool(x, window, stride), np_pool(x, window, stride, np.max), rtol=1e-6)
    np.testing.assert_allclose(layers.avg_pool(x, window, stride), np_pool(x, window, stride, np.mean),
                               rtol=1e-5, atol=1e-6)


def test_avg_pool_same_averages_real_inputs_only():
    x = np.ones((1, 5, 5, 1), np.float32)
    np.testing.assert_allclose(layers.avg_pool(x, 2, 2, "SAME"), np.ones((1, 3, 3, 1)), rtol=1e-6)


def test_max_pool_gradient_goes_to_the_max():
    x = jnp.asarray([[1.0, 5.0], [2.0, 3.0]]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda x: jnp.sum(layers.max_pool(x)))(x)
    np.testing.assert_array_equal(g.reshape(2, 2), [[0, 1], [0, 0]])


def test_relu_and_its_gradient_at_zero():
    x = jnp.asarray([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(layers.relu(x), [0, 0, 3])
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(layers.relu(x)))(x), [0, 0, 1])


def test_dense_and_flatten():
    x, w, b = random((4, 2, 3, 5), 8), random((30, 7), 9), random((7,), 10)
    flat = layers.flatten(jnp.asarray(x))
    assert flat.shape == (4, 30)
    np.testing.assert_allclose(layers.dense(flat, w, b), x.reshape(4, 30) @ w + b, rtol=1e-5, atol=1e-5)


def test_log_softmax_is_stable_for_large_logits():
    logits = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, 0.0, 1000.0], [1e4, 1e4, 1e4]], np.float32)
    got = np.asarray(layers.log_softmax(jnp.asarray(logits)))
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    want = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layers.softmax(jnp.asarray(logits)), np.exp(want), rtol=1e-6, atol=1e-7)


def test_cross_entropy_matches_numpy():
    logits, labels = random((6, 10), 11), np.array([0, 3, 9, 1, 1, 5])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = -np.log(p[np.arange(6), labels])
    np.testing.assert_allclose(layers.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
                               want, rtol=1e-5)


def finite_difference_check(f, args, eps=1e-3, samples=8, seed=0):
    """Compare jax.grad of scalar f with central differences in float64 along random coordinates."""
    with jax.enable_x64(True):
        args64 = [jnp.asarray(a, jnp.float64) for a in args]
        grads = jax.grad(f, argnums=tuple(range(len(args))))(*args64)
        rng = np.random.default_rng(seed)
        for i, (a, g) in enumerate(zip(args64, grads)):
            for _ in range(samples):
                idx = tuple(rng.integers(0, s) for s in a.shape)
                plus = [x.at[idx].add(eps) if j == i else x for j, x in enumerate(args64)]
                minus = [x.at[idx].add(-eps) if j == i else x for j, x in enumerate(args64)]
                numeric = (f(*plus) - f(*minus)) / (2 * eps)
                np.testing.assert_allclose(g[idx], numeric, rtol=1e-4, atol=1e-6)




@pytest.mark.parametrize("conv", [layers.conv2d, layers.conv2d_patches], ids=["lax", "patches"])
def test_conv_gradient_matches_finite_differences(conv):
    x, w, b = random((2, 7, 7, 2), 12), random((3, 3, 2, 3), 13), random((3,), 14)
    finite_difference_check(lambda x, w, b: jnp.sum(jnp.sin(conv(x, w, b, 2, "SAME"))), (x, w, b))


@pytest.mark.parametrize("pool", [layers.max_pool, layers.avg_pool], ids=["max", "avg"])
def test_pool_gradient_matches_finite_differences(pool):
    x = random((2, 6, 6, 3), 15)
    finite_difference_check(lambda x: jnp.sum(jnp.sin(pool(x))), (x,))


def test_cross_entropy_gradient_matches_finite_differences():
    logits, labels = random((5, 10), 16), jnp.asarray([1, 0, 9, 4, 4])
    finite_difference_check(lambda z: jnp.sum(layers.softmax_cross_entropy(z, labels)), (logits,))


def test_dense_gradient_matches_finite_differences():
    x, w, b = random((3, 6), 17), random((6, 4), 18), random((4,), 19)
    finite_difference_check(lambda x, w, b: jnp.sum(jnp.tanh(layers.dense(x, w, b))), (x, w, b))


# Property-based: for random valid geometry, shapes follow the formulas and values match NumPy.
@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), c=st.integers(1, 3), o=st.integers(1, 4),
       k=st.integers(1, 5), stride=st.integers(1, 3), padding=st.sampled_from(["VALID", "SAME"]),
       seed=st.integers(0, 2**16))
@pytest.mark.slow
def test_conv_property(h, w, c, o, k, stride, padding, seed):
    if padding == "VALID" and k > min(h, w):
        return
    x, wt, b = random((2, h, w, c), seed), random((k, k, c, o), seed + 1), random((o,), seed + 2)
    expected_shape = (2, layers.conv_output_size(h, k, stride, padding),
                      layers.conv_output_size(w, k, stride, padding), o)
    if padding == "SAME":
        assert expected_shape[1:3] == (-(-h // stride), -(-w // stride))
    else:
        assert expected_shape[1:3] == ((h - k) // stride + 1, (w - k) // stride + 1)
    want = np_conv(x, wt, b, stride, padding)
    for conv in (layers.conv2d, layers.conv2d_patches):   # each one program, not op by op
        got = jax.jit(conv, static_argnums=(3, 4))(jnp.asarray(x), jnp.asarray(wt), jnp.asarray(b), stride, padding)
        assert got.shape == expected_shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 10), w=st.integers(1, 10), window=st.integers(1, 4), stride=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_pool_property(h, w, window, stride, seed):
    if window > min(h, w):
        return
    x = random((2, h, w, 2), seed)
    shape = (2, (h - window) // stride + 1, (w - window) // stride + 1, 2)
    got_max, got_avg = layers.max_pool(x, window, stride), layers.avg_pool(x, window, stride)
    assert got_max.shape == got_avg.shape == shape
    np.testing.assert_allclose(got_max, np_pool(x, window, stride, np.max), rtol=1e-6)
    np.testing.assert_allclose(got_avg, np_pool(x, window, stride, np.mean), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kh,kw,stride", [(3, 3, 1), (5, 4, 2), (4, 4, 3)])
def test_unpad_same_undoes_pad_same_and_is_its_transpose(kh, kw, stride):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 6, 3)), jnp.float32)
    padded = layers.pad_same(x, kh, kw, stride)
    assert padded.shape[1] > 7 and padded.shape[2] > 6   # something was padded
    np.testing.assert_array_equal(layers.unpad_same(padded, (7, 6), kh, kw, stride), x)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(padded.shape), jnp.float32)
    _, vjp = jax.vjp(lambda v: layers.pad_same(v, kh, kw, stride), x)
    np.testing.assert_array_equal(vjp(cotangent)[0], layers.unpad_same(cotangent, (7, 6), kh, kw, stride))


# --------------------------------------------------------------------------- batch norm, dropout,
# residual add, global average pooling


def np_batch_norm(x, scale, bias, mean, var, train, momentum, eps=layers.BN_EPSILON):
    x = np.asarray(x, np.float64)
    if train:
        m = x.reshape(-1, x.shape[-1]).mean(axis=0)
        v = x.reshape(-1, x.shape[-1]).var(axis=0)
        return (x - m) / np.sqrt(v + eps) * scale + bias, momentum * mean + (1 - momentum) * m, \
            momentum * var + (1 - momentum) * v
    return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_matches_numpy(train):
    x = 3.0 * random((4, 5, 6, 3), 20) + 2.0
    scale, bias = random((3,), 21), random((3,), 22)
    mean, var = random((3,), 23), np.abs(random((3,), 24)) + 0.5
    got = layers.batch_norm(x, scale, bias, mean, var, train=train, momentum=0.8)
    want = np_batch_norm(x, scale, bias, mean, var, train, 0.8)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    if train:   # normalised by the batch: zero mean, unit variance per channel before scale and bias
        z = (np.asarray(got[0]) - bias) / scale
        np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(z.var(axis=(0, 1, 2)), 1, atol=1e-3)
    else:
        assert got[1] is mean and got[2] is var


def test_batch_norm_running_averages_get_no_gradient():
    x, scale, bias = random((4, 3, 3, 2), 25), random((2,), 26), random((2,), 27)

    def new_mean_sum(x):
        return jnp.sum(layers.batch_norm(x, scale, bias, jnp.zeros(2), jnp.ones(2), train=True)[1])
    np.testing.assert_array_equal(jax.grad(new_mean_sum)(x), 0)


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_gradient_matches_finite_differences(train):
    x, scale, bias = random((3, 4, 4, 2), 28), random((2,), 29), random((2,), 30)
    mean, var = random((2,), 31), np.abs(random((2,), 32)) + 0.5
    finite_difference_check(
        lambda x, s, b: jnp.sum(jnp.sin(layers.batch_norm(x, s, b, mean, var, train=train)[0])), (x, scale, bias))


def test_dropout_masks_and_scales():
    x = jnp.ones((64, 32))
    key = jax.random.key(0)
    y = np.asarray(layers.dropout(x, 0.25, key, train=True))
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert 0.2 < np.mean(y == 0) < 0.3                       # about the rate is dropped
    np.testing.assert_array_equal(layers.dropout(x, 0.25, key, train=True), y)    # same key, same mask
    assert not np.array_equal(layers.dropout(x, 0.25, jax.random.key(1), train=True), y)
    assert layers.dropout(x, 0.25, key, train=False) is x    # identity in evaluation
    assert layers.dropout(x, 0.0, key, train=True) is x      # and at rate 0
    # The mask as NumPy would apply it: kept values scaled by 1 / (1 - rate).
    z = random((8, 5), 33)
    kept = np.asarray(jax.random.bernoulli(key, 0.75, z.shape))
    np.testing.assert_allclose(layers.dropout(z, 0.25, key, train=True), np.where(kept, z / 0.75, 0), rtol=1e-6)


def test_dropout_gradient_matches_finite_differences():
    x, key = random((4, 6), 34), jax.random.key(3)
    finite_difference_check(lambda x: jnp.sum(jnp.sin(layers.dropout(x, 0.5, key, train=True))), (x,))


@pytest.mark.parametrize("stride", [1, 2])
def test_residual_add_matches_numpy(stride):
    x, w = random((2, 7, 7, 3), 35), random((3, 5), 36)
    oh = layers.conv_output_size(7, 1, stride)
    branch = random((2, oh, oh, 5), 37)
    want = branch + np_conv(x, w[None, None], np.zeros(5), stride, "VALID")
    np.testing.assert_allclose(layers.residual_add(branch, x, w, stride), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers.project(x, w, stride),
                               layers.conv2d(x, w[None, None], jnp.zeros(5), stride), rtol=1e-5, atol=1e-5)
    same = random((2, 7, 7, 3), 38)
    np.testing.assert_array_equal(layers.residual_add(same, x), same + x)   # no projection: identity shortcut
    with pytest.raises(ValueError, match="residual shapes differ"):
        layers.residual_add(branch, x)


def test_residual_add_gradient_matches_finite_differences():
    x, w, branch = random((2, 5, 5, 2), 39), random((2, 3), 40), random((2, 3, 3, 3), 41)
    finite_difference_check(lambda b, x, w: jnp.sum(jnp.sin(layers.residual_add(b, x, w, 2))), (branch, x, w))


def test_global_avg_pool_matches_numpy_and_its_gradient():
    x = random((3, 4, 5, 6), 42)
    np.testing.assert_allclose(layers.global_avg_pool(x), x.astype(np.float64).mean(axis=(1, 2)), rtol=1e-5)
    finite_difference_check(lambda x: jnp.sum(jnp.sin(layers.global_avg_pool(x))), (x,))


def test_label_smoothing_is_its_formula():
    """(1 - e) * (-log p[y]) + e * mean_k(-log p[k]), against NumPy; e = 0 is the plain cross-entropy, bit for bit."""
    logits, labels = random((6, 5), 3), jnp.asarray([0, 4, 2, 2, 1, 3])
    x = np.asarray(logits, np.float64)
    log_p = x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    nll = -log_p[np.arange(6), np.asarray(labels)]
    for e in (0.1, 0.5, 1.0):
        want = (1 - e) * nll + e * -log_p.mean(-1)
        np.testing.assert_allclose(layers.softmax_cross_entropy(logits, labels, e), want, rtol=1e-5)
    # The same as the cross-entropy against the smoothed one-hot target (timm's off value e / K).
    target = np.full((6, 5), 0.1 / 5) + np.eye(5)[np.asarray(labels)] * 0.9
    np.testing.assert_allclose(layers.softmax_cross_entropy(logits, labels, 0.1), -(target * log_p).sum(-1),
                               rtol=1e-5)
    np.testing.assert_array_equal(layers.softmax_cross_entropy(logits, labels, 0.0),
                                  layers.softmax_cross_entropy(logits, labels))


def test_drop_path_drops_whole_examples_and_keeps_the_expectation():
    """Each example's branch is all zero or all x / (1 - rate); over many keys the mean is x; evaluation is x."""
    x, rate = random((4, 3, 3, 2), 5) + 2.0, 0.25
    draws = jax.vmap(lambda k: layers.drop_path(x, rate, k, train=True))(jax.random.split(jax.random.key(0), 4000))
    kept = np.all(np.isclose(draws, x / (1 - rate)), axis=(2, 3, 4))
    dropped = np.all(draws == 0, axis=(2, 3, 4))
    assert np.all(kept ^ dropped)
    assert abs(dropped.mean() - rate) < 0.02
    np.testing.assert_allclose(draws.mean(0), x, rtol=0.05)
    assert layers.drop_path(x, rate, None, train=False) is x and layers.drop_path(x, 0.0, None, train=True) is x
