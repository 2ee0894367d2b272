"""The tutorial's CNN family (cnn_jax/models/cnn.py): params layout, init schemes, the debug
shape trace, derived sizes, FLOPs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.models import cnn
from cnn_jax.config import Config

SEED_TRACE = ["conv1    26x26x20", "pool1    13x13x20", "conv2    9x9x50", "pool2    4x4x50",
              "flatten  800", "dense1   128", "output   10"]


def test_debug_trace_of_the_tutorials_network(capsys):
    config = Config()
    params = cnn.init(jax.random.key(0), config)[0]
    logits = cnn.apply(params, {}, jnp.zeros((3, 28, 28, 1)), config, debug=True)[0]
    assert logits.shape == (3, 10)
    assert capsys.readouterr().out.splitlines() == SEED_TRACE


def test_params_are_a_nested_dict_by_layer_name():
    params = cnn.init(jax.random.key(0), Config())[0]
    shapes = {name: {k: v.shape for k, v in layer.items()} for name, layer in params.items()}
    assert shapes == {"conv1": {"w": (3, 3, 1, 20), "b": (20,)}, "conv2": {"w": (5, 5, 20, 50), "b": (50,)},
                      "dense1": {"w": (800, 128), "b": (128,)}, "output": {"w": (128, 10), "b": (10,)}}


@pytest.mark.parametrize("overrides,flat", [
    ({"conv_filters": (8, 16, 32), "conv_kernels": (3, 3, 3)}, 32),   # 26-13-11-5-3-1
    ({"conv_kernels": (5, 5)}, 4 * 4 * 50),
    ({"conv_padding": "SAME"}, 7 * 7 * 50),
    ({"input_shape": (32, 32, 3), "num_classes": 5, "num_fc": 64}, 5 * 5 * 50),
])
def test_flattened_size_is_derived(overrides, flat):
    config = model.validate(config_lib.replace(Config(), **overrides))
    assert dict(model.layer_shapes(config))["flatten"] == (flat,)
    params = cnn.init(jax.random.key(1), config)[0]
    assert params["dense1"]["w"].shape == (flat, config.num_fc)
    logits = jax.jit(lambda p, x: cnn.apply(p, {}, x, config)[0])(params, jnp.ones((2,) + config.input_shape))
    assert logits.shape == (2, config.num_classes)


def test_normal_init_draws_every_weight_and_bias_from_n0_scale():
    config = config_lib.replace(Config(), init="normal", weight_scale=0.05)
    params = cnn.init(jax.random.key(0), config)[0]
    w = np.asarray(params["dense1"]["w"])
    assert abs(w.std() - 0.05) < 0.002 and abs(w.mean()) < 0.002
    assert np.asarray(params["conv2"]["b"]).std() > 0.02  # biases are random too


@pytest.mark.parametrize("init,gain", [("he", 2.0), ("lecun", 1.0)])
def test_fan_in_init(init, gain):
    params = cnn.init(jax.random.key(0), config_lib.replace(Config(), init=init))[0]
    w = np.asarray(params["conv2"]["w"])
    assert abs(w.std() - np.sqrt(gain / (5 * 5 * 20))) < 0.01 * np.sqrt(gain / 500)
    assert not np.any(params["conv2"]["b"])


def test_init_is_deterministic_per_key():
    a = cnn.init(jax.random.key(3), Config())[0]
    b = cnn.init(jax.random.key(3), Config())[0]
    c = cnn.init(jax.random.key(4), Config())[0]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not np.array_equal(a["conv1"]["w"], c["conv1"]["w"])


def test_conv_lowerings_give_the_same_logits_and_gradients():
    """lax and patches sum in different orders (rounding that depends on the CPU), so each array is
    compared relative to its own scale: max|a - b| <= 1e-4 * max|b|, far below a real error."""
    images = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    labels = jnp.arange(4)
    results = []
    for impl in ("lax", "patches"):
        config = config_lib.replace(Config(), conv_impl=impl)
        params = cnn.init(jax.random.key(0), config)[0]

        def loss(p, config=config):
            logits = cnn.apply(p, {}, images, config)[0]
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), logits
        grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
        results.append((np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]))
    for got, want in zip([results[0][0], *results[0][1]], [results[1][0], *results[1][1]]):
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("overrides", [{}, {"init": "normal", "weight_scale": 0.01},
                                       {"conv_filters": (8, 16, 32), "conv_kernels": (3, 3, 3),
                                        "conv_padding": "SAME", "num_fc": 33, "init": "lecun"}])
def test_init_is_bit_identical_to_one_draw_per_tensor(overrides):
    """The shared-size sampler is an optimisation only: every tensor is what
    `jax.random.normal(its key, its shape)` gives, as documented results were drawn."""
    config = config_lib.replace(Config(), **overrides)
    params = cnn.init(jax.random.key(11), config)[0]
    shapes = cnn.param_shapes(config)
    keys = jax.random.split(jax.random.key(11), 2 * len(shapes)).reshape(len(shapes), 2)
    for (name, layer), (kw, kb) in zip(shapes.items(), keys):
        if config.init == "normal":
            expected_w = config.weight_scale * jax.random.normal(kw, layer["w"], jnp.float32)
            expected_b = config.weight_scale * jax.random.normal(kb, layer["b"], jnp.float32)
        else:
            gain = 2.0 if config.init == "he" else 1.0
            expected_w = math.sqrt(gain / math.prod(layer["w"][:-1])) * jax.random.normal(kw, layer["w"], jnp.float32)
            expected_b = jnp.zeros(layer["b"], jnp.float32)
        np.testing.assert_array_equal(params[name]["w"], expected_w)
        np.testing.assert_array_equal(params[name]["b"], expected_b)


def test_flops_of_the_tutorials_network_come_from_the_shape_walk():
    forward, total = model.flops(Config())
    conv1, conv2 = 2 * 26 * 26 * 9 * 20, 2 * 9 * 9 * 25 * 20 * 50
    assert forward == conv1 + conv2 + 2 * 800 * 128 + 2 * 128 * 10
    assert total == 3 * forward - conv1       # no input gradient for the first layer


@pytest.mark.parametrize("overrides,message", [
    ({"conv_kernels": (3, 30)}, "conv2 kernel 30 is larger than its 13x13 input"),
    ({"pool_window": 30, "pool_stride": 30}, "pool1 window is larger"),
    ({"conv_filters": ()}, "--conv_filters is empty"),
    ({"conv_filters": (20,)}, "differ in length"),
])
def test_validate_walks_the_network_once(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        cnn.validate(config_lib.replace(Config(), **overrides))
    with pytest.raises(config_lib.ConfigError, match=message):   # model.validate runs it
        model.validate(config_lib.replace(Config(), **overrides))


@pytest.mark.parametrize("overrides,message", [
    ({"pool": "min"}, "--pool='min' is not allowed: use one of max, avg"),
    ({"conv_padding": "FULL"}, "--conv_padding='FULL' is not allowed: use one of VALID, SAME"),
    ({"conv_stride": 0}, "--conv_stride=0 is not allowed: it must be positive"),
    ({"pool_window": 0}, "--pool_window=0 is not allowed: it must be positive"),
    ({"num_fc": 0}, "--num_fc=0 is not allowed: it must be positive"),
    ({"pool_impl": "reshape", "pool_window": 3}, "--pool_impl=reshape needs --pool_window == --pool_stride (got 3 "
                                                 "and 2); use --pool_impl=reduce_window"),
    ({"conv_impl": "winograd", "layout": "NHWC"}, "--conv_impl=winograd runs in the fused channel-major block"),
])
def test_the_family_checks_its_conv_and_pooling_fields(overrides, message):
    """Checks of fields only this family reads: its own `validate`, not `config.validate`."""
    config = config_lib.replace(Config(), **overrides)
    assert config_lib.validate(config) is config
    with pytest.raises(config_lib.ConfigError) as info:
        cnn.validate(config)
    assert str(info.value).startswith(message)
