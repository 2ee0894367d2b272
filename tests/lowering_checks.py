"""Shared by tests/test_lowering.py and tests/test_cnn_blocks.py: the reference strategy, the
strategies held equal to it, and value-and-gradient comparisons."""

import jax
import jax.numpy as jnp
import numpy as np

RTOL, ATOL = 1e-5, 1e-5


REFERENCE = {"conv_impl": "lax", "pool_impl": "reduce_window", "layout": "NHWC"}


STRATEGIES = [
    {"conv_impl": "patches", "pool_impl": "reduce_window", "layout": "NHWC"},
    {"conv_impl": "lax", "pool_impl": "reshape", "layout": "NHWC"},
    {"conv_impl": "patches", "pool_impl": "reshape", "layout": "NHWC"},
    {"conv_impl": "patches", "pool_impl": "reshape", "layout": "CHWN"},
    {"conv_impl": "lax", "pool_impl": "reshape", "layout": "CHWN"},
    {"conv_impl": "lax", "pool_impl": "reduce_window", "layout": "CHWN"},
    {"conv_impl": "winograd", "pool_impl": "reshape", "layout": "CHWN"},
]


def random_array(shape, seed=0, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape, np.float32))


def value_and_vjp(f, args, cotangent):
    """f(*args) and its gradients for `cotangent`, as numpy, in one compiled call."""
    @jax.jit
    def run(args, cotangent):
        y, vjp = jax.vjp(f, *args)
        return y, vjp(cotangent)
    return jax.tree.map(np.asarray, run(args, cotangent))


def assert_same_vjp(f_ref, f_new, args, seed=1):
    """Equal outputs, and equal gradients of every argument for a random cotangent."""
    cotangent = random_array(jax.eval_shape(f_ref, *args).shape, seed)
    y_ref, grads_ref = value_and_vjp(f_ref, args, cotangent)
    y_new, grads_new = value_and_vjp(f_new, args, cotangent)
    np.testing.assert_allclose(y_new, y_ref, rtol=RTOL, atol=ATOL)
    for g_new, g_ref in zip(grads_new, grads_ref):
        np.testing.assert_allclose(g_new, g_ref, rtol=RTOL, atol=ATOL)
