"""Lowerings: every faster lowering equals the reference (layers.py) in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.nn import layers, lowering
from cnn_jax.config import Config
from lowering_checks import REFERENCE, assert_same_vjp, random_array, value_and_vjp

@pytest.mark.parametrize("shape,window", [((2, 26, 26, 3), 2), ((2, 9, 9, 4), 2), ((1, 12, 11, 2), 3),
                                          ((3, 7, 8, 1), 2), ((2, 4, 4, 5), 4)])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_reshape_pool_equals_reduce_window(shape, window, pool):
    ref = {"max": layers.max_pool, "avg": layers.avg_pool}[pool]
    new = {"max": lowering.max_pool_reshape, "avg": lowering.avg_pool_reshape}[pool]
    assert_same_vjp(lambda x: ref(x, window, window), lambda x: new(x, window), (random_array(shape),))

@pytest.mark.parametrize("window", [2, 3])
def test_max_pool_ties_route_the_gradient_to_the_first_maximum_like_select_and_scatter(window):
    # Few distinct values: most windows hold tied maxima, including relu's zeros.
    x = jnp.asarray(np.maximum(np.random.default_rng(0).integers(0, 3, (2, 12, 13, 3)) - 1.0, 0.0)
                    .astype(np.float32))
    g = random_array((2, 12 // window, 13 // window, 3))
    grad_ref = value_and_vjp(lambda v: layers.max_pool(v, window, window), (x,), g)[1][0]
    grad_new = value_and_vjp(lambda v: lowering.max_pool_reshape(v, window), (x,), g)[1][0]
    assert np.array_equal(grad_new, grad_ref)
    # Each window's cotangent lands on exactly one input.
    assert np.sum(grad_new != 0) == np.sum(np.asarray(g) != 0)

def test_max_pool_gradient_inside_one_jitted_training_program():
    """The reshape pool's gradient inside a jitted VGG loss (conv -> batch norm -> relu -> pool,
    twice, then dropout) equals reduce_window's: XLA may recompute the pooled input in the backward
    pass with other rounding, so the backward must not find each window's maximum again by value
    (it then sent gradients to no element or the wrong one)."""
    from cnn_jax import model
    config = config_lib.replace(Config(), model="vgg", widths=(4, 8), depth=1, dropout=0.25, conv_impl="lax")
    params, model_state = model.init(jax.random.key(0), config)
    images = jax.random.uniform(jax.random.key(1), (4, *config.input_shape))

    def loss(params, config):
        logits, _ = model.apply(params, model_state, images, config, train=True, rng=jax.random.key(3))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), jnp.arange(4)])

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    got = grad(params, config_lib.replace(config, pool_impl="reshape"))
    want = grad(params, config_lib.replace(config, pool_impl="reduce_window"))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(w).max())))

@pytest.mark.parametrize("pool", ["max", "avg"])
def test_reshape_pool_on_other_spatial_axes(pool):
    x = random_array((3, 2, 10, 9))   # (C, N, H, W)
    ref = {"max": layers.max_pool, "avg": layers.avg_pool}[pool]
    new = {"max": lowering.max_pool_reshape, "avg": lowering.avg_pool_reshape}[pool]
    assert_same_vjp(lambda v: jnp.transpose(ref(jnp.transpose(v, (1, 2, 3, 0)), 2, 2), (3, 0, 1, 2)),
                     lambda v: new(v, 2, (2, 3)), (x,))

def test_auto_strategy_per_backend():
    cpu = lowering.resolve(Config(), "cpu")
    assert (cpu.conv_impl, cpu.pool_impl, cpu.layout, cpu.loop, cpu.ynnpack) == (
        "winograd", "reshape", "CHWN", "scan", "off")
    nhwc = lowering.resolve(config_lib.replace(Config(), layout="NHWC"), "cpu")
    assert (nhwc.conv_impl, nhwc.layout) == ("patches", "NHWC")
    gpu = lowering.resolve(Config(), "gpu")
    assert (gpu.conv_impl, gpu.pool_impl, gpu.layout, gpu.loop, gpu.ynnpack) == (
        "lax", "reshape", "NHWC", "scan", "on")
    overlapping = lowering.resolve(config_lib.replace(Config(), pool_window=3, pool_stride=2), "cpu")
    assert (overlapping.conv_impl, overlapping.pool_impl, overlapping.layout) == (
        "patches", "reduce_window", "NHWC")
    chosen = lowering.resolve(config_lib.replace(Config(), **REFERENCE, loop="scan"), "cpu")
    assert chosen.describe() == "conv=lax pool=reduce_window layout=NHWC loop=scan ynnpack=off"
    # XLA:CPU's own convolution runs 10-30x slower inside a loop body: one call per batch instead,
    # on CPU only, and an explicit --loop is kept.
    lax_conv = config_lib.replace(Config(), conv_impl="lax")
    assert lowering.resolve(lax_conv, "cpu").loop == "step"
    assert lowering.resolve(lax_conv, "gpu").loop == "scan"

def test_reshape_pool_needs_window_equal_to_stride():
    with pytest.raises(config_lib.ConfigError, match="--pool_impl=reshape"):
        model.validate(config_lib.replace(Config(), pool_impl="reshape", pool_window=3, pool_stride=2))

@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU option")
@pytest.mark.parametrize("ynnpack,fused", [("auto", False), ("off", False), ("on", True)])
def test_ynnpack_option_reaches_the_compiled_step(ynnpack, fused):
    from cnn_jax.engine import optim, state, step
    config = config_lib.replace(Config(), ynnpack=ynnpack)
    assert (lowering.compiler_options(config) == {}) == (ynnpack == "on")
    optimizer = optim.make_optimizer(config, 10)
    runner = step.make_step_runner(config, step.make_train_step(config, optimizer))
    images, labels = jnp.zeros((128, 28, 28, 1)), jnp.zeros((128,), jnp.int32)
    hlo = runner.lower(state.create(config, optimizer), images, labels, jnp.arange(128), 0).compile().as_text()
    assert ("__ynn_fusion" in hlo) == fused

def test_inference_uses_the_fastest_forward_lowering_and_keeps_explicit_choices():
    inference = lowering.inference_config(Config())
    assert (inference.conv_impl, inference.layout, inference.pool_impl) == ("lax", "NHWC", "auto")
    avg = lowering.inference_config(config_lib.replace(Config(), pool="avg"))
    assert (avg.conv_impl, avg.layout, avg.pool_impl) == ("lax", "NHWC", "reduce_window")
    chosen = config_lib.replace(Config(), conv_impl="patches")
    assert lowering.inference_config(chosen) == chosen

