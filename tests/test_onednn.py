"""oneDNN's convolutions (`--conv_impl=onednn`): equal to the reference convolution in value and
gradient, under jit, scan and vmap; a clear one-line error where they cannot be built."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.nn import layers, lowering, onednn
from cnn_jax.config import ConfigError
from conftest import REPO_ROOT

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN or a C++ compiler is missing here")


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _value_and_grads(conv, x, w, b, stride, padding, g):
    @jax.jit
    def run(x, w, b):
        y, vjp = jax.vjp(lambda x, w, b: conv(x, w, b, stride, padding), x, w, b)
        return y, vjp(g)
    return jax.tree.map(np.asarray, run(x, w, b))


@needs_onednn
@pytest.mark.parametrize("shape, kernel, out, stride, padding", [
    ((3, 9, 9, 4), 3, 5, 1, "SAME"),
    ((2, 8, 7, 3), 3, 6, 1, "VALID"),
    ((2, 9, 8, 5), 3, 7, 2, "SAME"),     # odd size at stride 2: SAME pads one more at the end
    ((2, 10, 10, 1), 5, 4, 1, "VALID"),
    ((2, 6, 6, 8), 1, 16, 2, "VALID"),  # a 1x1 projection
])
def test_value_and_gradients_equal_the_reference(shape, kernel, out, stride, padding):
    x, w, b = _random(shape, 0), _random((kernel, kernel, shape[3], out), 1), _random((out,), 2)
    y_shape = jax.eval_shape(lambda: layers.conv2d(x, w, b, stride, padding)).shape
    g = _random(y_shape, 3)
    got = _value_and_grads(onednn.conv2d, x, w, b, stride, padding, g)
    want = _value_and_grads(layers.conv2d, x, w, b, stride, padding, g)
    assert got[0].shape == want[0].shape
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))


@needs_onednn
@pytest.mark.parametrize("shape, window, integers", [
    ((2, 6, 6, 3), 2, False),
    ((3, 7, 9, 5), 2, False),    # odd sizes: the last row and column are left out, as VALID pooling does
    ((2, 9, 9, 4), 3, False),
    ((4, 8, 8, 16), 2, True),    # small integers: many tied maxima, each gradient to the first one
])
def test_max_pool_value_and_gradient_equal_the_reference(shape, window, integers):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 3, shape) if integers else rng.standard_normal(shape), jnp.float32)
    out = (shape[0], shape[1] // window, shape[2] // window, shape[3])
    g = _random(out, 1)

    def value_and_grad(pool):
        return jax.tree.map(np.asarray, jax.jit(lambda x: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(pool, x)))(x))
    got = value_and_grad(lambda x: onednn.max_pool(x, window))
    want = value_and_grad(lambda x: layers.max_pool(x, window, window))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1][0], want[1][0])


@needs_onednn
def test_runs_inside_scan_and_vmap():
    x, w = _random((2, 6, 6, 3), 0), _random((3, 3, 3, 4), 1)
    ws = jnp.stack([w, 2 * w])
    reference = jax.vmap(lambda w: layers.conv2d(x, w, 0.0, 1, "SAME"))(ws)
    np.testing.assert_allclose(jax.jit(jax.vmap(lambda w: onednn.conv2d(x, w, 0.0, 1, "SAME")))(ws), reference,
                               rtol=1e-5, atol=1e-5)

    def body(carry, w):
        return carry + jnp.sum(onednn.conv2d(x, w, 0.0, 1, "SAME")), None
    total, _ = jax.jit(lambda ws: jax.lax.scan(body, 0.0, ws))(ws)
    np.testing.assert_allclose(total, float(jnp.sum(reference)), rtol=1e-5)


@needs_onednn
def test_the_same_inputs_give_the_same_bits():
    x, w = _random((8, 12, 12, 16), 0), _random((3, 3, 16, 32), 1)
    g = _random((8, 12, 12, 32), 2)
    first = _value_and_grads(onednn.conv2d, x, w, 0.0, 1, "SAME", g)
    second = _value_and_grads(onednn.conv2d, x, w, 0.0, 1, "SAME", g)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(a, b)


@needs_onednn
def test_the_library_is_built_once_into_the_cache():
    path = onednn.load()
    assert path.endswith(".so") and "onednn_conv-" in path
    assert onednn.load() == path   # cached: no second build


def test_a_missing_compiler_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CNN_JAX_CACHE", str(tmp_path))          # nothing built there yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(onednn.OnednnUnavailable) as raised:
        onednn.load.__wrapped__()
    message = str(raised.value)
    assert "\n" not in message and "--conv_impl=onednn" in message
    assert ("C++ compiler" in message or "not installed" in message) and "--conv_impl=patches" in message
    assert list(tmp_path.iterdir()) == []    # nothing half-built left behind


def test_the_command_line_says_in_one_line_what_to_install(tmp_path, mnist_dir):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), CNN_JAX_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=REPO_ROOT)
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "train.py"), "--preset=vgg",
                           "--conv_impl=onednn", f"--data_dir={mnist_dir}", f"--workdir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr
    assert "--conv_impl=onednn: no C++ compiler" in errors[0] and "apt-get install g++" in errors[0]


def test_onednn_needs_nhwc_a_cpu_and_a_family_that_pools_on_its_own():
    with pytest.raises(ConfigError, match="--conv_impl=onednn runs on NHWC activations"):
        model.validate(config_lib.replace(config_lib.Config(), conv_impl="onednn", layout="CHWN"))
    with pytest.raises(ConfigError, match="--conv_impl=onednn runs on CPU only"):
        lowering.resolve(config_lib.replace(config_lib.Config(), conv_impl="onednn"), "gpu")
    with pytest.raises(ConfigError, match="--pool_impl=onednn is not available for --model=cnn"):
        model.validate(config_lib.replace(config_lib.Config(), pool_impl="onednn"))
    chosen = lowering.resolve(config_lib.replace(config_lib.Config(), conv_impl="onednn"), "cpu")
    assert (chosen.conv_impl, chosen.layout, chosen.loop) == ("onednn", "NHWC", "scan")
