"""The tutorial CNN's fused blocks (cnn_jax/models/cnn_blocks.py) and the whole network under
every strategy, held equal to the reference in value and gradient."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.nn import layers, lowering, onednn
from cnn_jax.models import cnn, cnn_blocks
from cnn_jax.config import Config
from lowering_checks import REFERENCE, RTOL, STRATEGIES, assert_same_vjp, random_array, value_and_vjp


BLOCKS = [
    {},                                                        # the tutorial's conv1 shape family
    {"conv_stride": 2},
    {"conv_padding": "SAME"},
    {"pool_window": 3, "pool_stride": 3},
    {"pool_window": 3, "pool_stride": 2},                      # window != stride: reduce_window
]


@pytest.mark.parametrize("overrides", BLOCKS)
@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: "-".join(s.values()))
def test_conv_block_equals_the_reference_block(overrides, pool, strategy):
    config = config_lib.replace(Config(), pool=pool, **overrides)
    if strategy["pool_impl"] == "reshape" and config.pool_window != config.pool_stride:
        pytest.skip("reshape pooling needs window == stride (validate rejects it)")
    # (With 3 input channels, conv_impl=winograd runs patches here: the Winograd tests are below.)
    resolved = lowering.resolve(config_lib.replace(config, loop="step", **strategy))
    x, w, b = random_array((2, 13, 12, 3)), random_array((5, 5, 3, 6), 1, 0.3), random_array((6,), 2)
    chwn = resolved.layout == "CHWN"

    def ref(x, w, b):
        y = layers.relu(layers.conv2d(x, w, b, config.conv_stride, config.conv_padding))
        return layers.POOLS[pool](y, config.pool_window, config.pool_stride)

    def new(x, w, b):
        if chwn:
            x = jnp.transpose(x, (3, 1, 2, 0))
        y = cnn_blocks.conv_block(x, w, b, config, resolved)
        return jnp.transpose(y, (3, 1, 2, 0)) if chwn else y

    assert_same_vjp(ref, new, (x, w, b))


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_fused_channel_major_block_routes_tied_maxima_like_the_reference(pool):
    # Small integers: every sum is exact in float32, so equal routing means bit-equal gradients,
    # and most pooling windows hold tied maxima (positive ones included).
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 2, (2, 12, 12, 2)).astype(np.float32))
    w = jnp.asarray(rng.integers(-1, 2, (3, 3, 2, 4)).astype(np.float32))
    b = jnp.asarray(np.array([1.0, 0.0, -1.0, 2.0], np.float32))
    config = config_lib.replace(Config(), pool=pool)
    strategy = lowering.resolve(config_lib.replace(config, layout="CHWN", conv_impl="patches",
                                                   pool_impl="reshape", loop="step"))

    def ref(x, w, b):
        return layers.POOLS[pool](layers.relu(layers.conv2d(x, w, b)), 2, 2)

    def new(x, w, b):
        y = cnn_blocks.conv_block(jnp.transpose(x, (3, 1, 2, 0)), w, b, config, strategy)
        return jnp.transpose(y, (3, 1, 2, 0))

    y = np.asarray(layers.relu(layers.conv2d(x, w, b)))[:, :10, :10]
    windows = y.reshape(2, 5, 2, 5, 2, 4).transpose(0, 1, 3, 5, 2, 4).reshape(-1, 4)
    tied = (windows == windows.max(1, keepdims=True)).sum(1) > 1
    assert (tied & (windows.max(1) > 0)).mean() > 0.2
    cotangent = random_array((2, 5, 5, 4), 3)
    y_ref, grads_ref = value_and_vjp(ref, (x, w, b), cotangent)
    y_new, grads_new = value_and_vjp(new, (x, w, b), cotangent)
    assert np.array_equal(y_new, y_ref)
    for g_new, g_ref in zip(grads_new, grads_ref):
        np.testing.assert_allclose(g_new, g_ref, rtol=1e-6, atol=1e-5)


OTHER_NETWORKS = [
    {"conv_filters": (8, 16, 32), "conv_kernels": (3, 3, 3)},
    {"conv_padding": "SAME", "conv_kernels": (5, 5)},
    {"input_shape": (32, 32, 3), "num_fc": 32},
]


def _loss_and_grads(config: Config, overrides: tuple) -> tuple:
    """Summed cross-entropy of 4 fixed images and its gradient, as numpy, for config + overrides."""
    config = model.validate(config_lib.replace(config, **dict(overrides)))
    params = jax.tree.map(lambda shape: random_array(shape, len(shape), 0.2), cnn.param_shapes(config),
                          is_leaf=lambda x: isinstance(x, tuple))
    images = jnp.asarray(np.random.default_rng(1).random((4,) + tuple(config.input_shape), np.float32))
    labels = jnp.asarray(np.arange(4) % config.num_classes)

    def loss(p):
        return jnp.sum(layers.softmax_cross_entropy(cnn.apply(p, {}, images, config)[0], labels))

    return jax.tree.map(np.asarray, jax.jit(jax.value_and_grad(loss))(params))


_reference_loss_and_grads = functools.lru_cache(maxsize=None)(
    lambda config: _loss_and_grads(config, tuple(REFERENCE.items())))


def _assert_model_matches_reference(config: Config, strategy: dict) -> None:
    value_ref, grad_ref = _reference_loss_and_grads(config)
    value_new, grad_new = _loss_and_grads(config, tuple(strategy.items()))
    np.testing.assert_allclose(value_new, value_ref, rtol=RTOL)
    for g_new, g_ref in zip(jax.tree.leaves(grad_new), jax.tree.leaves(grad_ref)):
        # Summation order differs: hold each tensor to float32 rounding at its own scale.
        np.testing.assert_allclose(g_new, g_ref, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(g_ref).max()))


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: "-".join(s.values()))
def test_seed_network_gradients_equal_the_reference(pool, strategy):
    _assert_model_matches_reference(config_lib.replace(Config(), pool=pool), strategy)


@pytest.mark.parametrize("overrides", OTHER_NETWORKS)
@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("strategy", STRATEGIES[2:4] + STRATEGIES[-1:], ids=lambda s: "-".join(s.values()))
def test_other_network_gradients_equal_the_reference(overrides, pool, strategy):
    _assert_model_matches_reference(config_lib.replace(Config(), pool=pool, **overrides), strategy)


@pytest.mark.skipif(not onednn.available(), reason="oneDNN or a C++ compiler is missing here")
@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("pool_impl", ["reshape", "reduce_window"])
def test_seed_network_with_onednn_convolutions_equals_the_reference(pool, pool_impl):
    _assert_model_matches_reference(config_lib.replace(Config(), pool=pool),
                                    {"conv_impl": "onednn", "pool_impl": pool_impl, "layout": "NHWC"})


def test_winograd_applies_where_its_tiles_fit_and_the_products_pay():
    applies = cnn_blocks.winograd_applies
    assert applies(5, 1, 20, (9, 9), 2)            # the tutorial's conv2: 8x8 pooled outputs, 2x2 tiles
    assert not applies(3, 1, 1, (26, 26), 2)       # the tutorial's conv1: one input channel
    assert applies(3, 1, 8, (11, 11), 2)           # F(2x2, 3x3): 10 pooled rows, 5 tiles
    assert not applies(5, 2, 20, (9, 9), 2)        # stride 2
    assert not applies(7, 1, 20, (9, 9), 2)        # no 7x7 transform
    assert not applies(5, 1, 20, (10, 10), 2)      # 10 pooled rows are not whole 4-row tiles
    assert not applies(5, 1, 20, (9, 9), 3)        # 3x3 windows do not split 4x4 tiles


def _winograd_block_cases():
    # (C, H, W, kernel, O, padding): the tutorial's conv2, SAME padding, F(2x2, 3x3), rectangular
    # inputs with a row and column the pool drops, and a single channel.
    return [(20, 13, 13, 5, 50, "VALID"), (3, 12, 12, 5, 7, "SAME"), (4, 10, 10, 3, 6, "SAME"),
            (2, 11, 15, 3, 5, "VALID"), (3, 13, 17, 5, 4, "VALID"), (1, 14, 14, 3, 3, "VALID")]


@pytest.mark.parametrize("case", _winograd_block_cases(), ids=str)
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_winograd_block_equals_the_reference_block(case, pool):
    c, h, w_, kernel, o, padding = case
    x, w, b = random_array((3, h, w_, c)), random_array((kernel, kernel, c, o), 1, 0.3), random_array((o,), 2)

    def ref(x, w, b):
        y = layers.relu(layers.conv2d(x, w, b, 1, padding))
        return layers.POOLS[pool](y, 2, 2)

    def new(x, w, b):
        y = cnn_blocks.pooled_conv_winograd(jnp.transpose(x, (3, 1, 2, 0)), w, b, padding, pool, 2)
        return jnp.transpose(y, (3, 1, 2, 0))

    cotangent = random_array(jax.eval_shape(ref, x, w, b).shape, 3)
    y_ref, grads_ref = value_and_vjp(ref, (x, w, b), cotangent)
    y_new, grads_new = value_and_vjp(new, (x, w, b), cotangent)
    # The transforms round differently from a direct sum (F(4x4, 5x5) mixes terms up to 5.25x
    # larger): each array is held to float32 rounding at its own scale.
    for new_, ref_ in zip([y_new, *grads_new], [y_ref, *grads_ref]):
        np.testing.assert_allclose(new_, ref_, rtol=1e-4, atol=2e-5 * np.abs(ref_).max())


def test_winograd_runs_only_the_layers_it_applies_to():
    config = config_lib.replace(Config(), conv_impl="winograd")
    strategy = lowering.resolve(config, "cpu")
    params, _ = cnn.init(jax.random.key(0), config)
    jaxpr = str(jax.make_jaxpr(lambda p, x: cnn.apply(p, {}, x, config)[0])(params, jnp.zeros((2, 28, 28, 1))))
    assert strategy.describe().startswith("conv=winograd")
    assert jaxpr.count("pooled_conv_winograd") == 1 and jaxpr.count("pooled_conv_chwn") == 1


@pytest.mark.parametrize("overrides", [{"layout": "NHWC"}, {"pool_impl": "reduce_window"},
                                       {"pool_window": 3, "pool_stride": 2}])
def test_winograd_needs_the_fused_channel_major_block(overrides):
    with pytest.raises(config_lib.ConfigError, match="--conv_impl=winograd runs in the fused"):
        model.validate(config_lib.replace(Config(), conv_impl="winograd", **overrides))


@pytest.mark.parametrize("shape", [(50, 4, 4, 6), (3, 2, 5, 4)])
def test_dense_from_channel_major_equals_flatten_then_dense(shape):
    c, h, w, n = shape
    x, weights, b = random_array(shape), random_array((h * w * c, 7), 1), random_array((7,), 2)

    def ref(x, weights, b):   # the reference flattens NHWC
        return layers.dense(layers.flatten(jnp.transpose(x, (3, 1, 2, 0))), weights, b)

    assert_same_vjp(ref, cnn_blocks.dense_from_chwn, (x, weights, b))


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, "VALID"), (5, 1, "VALID"), (3, 2, "VALID"),
                                                   (3, 1, "SAME"), (4, 2, "SAME"), (1, 1, "VALID")])
def test_channel_major_batch_minor_patches_conv_equals_lax_conv(kernel, stride, padding):
    x, w, b = random_array((2, 11, 10, 3)), random_array((kernel, kernel, 3, 4), 1), random_array((4,), 2)

    def ref(x, w, b):
        return layers.conv2d(x, w, b, stride, padding)

    def new(x, w, b):
        y = cnn_blocks.conv2d_patches_chwn(jnp.transpose(x, (3, 1, 2, 0)), w, stride, padding)
        return jnp.transpose(y, (3, 1, 2, 0)) + b

    assert_same_vjp(ref, new, (x, w, b))


@pytest.mark.parametrize("m,r", [(2, 3), (4, 5)])
def test_winograd_matrices_compute_the_valid_correlation(m, r):
    at, g, bt = cnn_blocks.winograd_matrices(m, r)
    assert at.shape == (m, m + r - 1) and g.shape == (m + r - 1, r) and bt.shape == (m + r - 1,) * 2
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, w = rng.standard_normal(m + r - 1), rng.standard_normal(r)
        np.testing.assert_allclose(at @ ((g @ w) * (bt @ d)), np.correlate(d, w, "valid"), rtol=1e-12, atol=1e-12)
