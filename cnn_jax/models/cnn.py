"""The tutorial's CNN (`--model=cnn`, the default): a model family of `cnn_jax.models`.

Architecture (the tutorial's by default): for each conv layer i, conv{i} -> relu ->
pool{i}; then flatten -> dense1 -> relu -> output (logits). Params are a nested
dict keyed by layer name: {"conv1": {"w", "b"}, ..., "dense1": {...}, "output": {...}}.
It has no model state and no randomness: `init` returns `{}` as the model state and
`apply` ignores `train` and `rng`. On CPU it runs the fused lowerings of `cnn_jax.nn.lowering`.

    params, model_state = cnn.init(jax.random.key(0), config)
    logits, model_state = cnn.apply(params, model_state, images, config, train=False, rng=None)
"""

from __future__ import annotations

import functools
import math


import jax
import jax.numpy as jnp

from cnn_jax.nn import layers, lowering
from cnn_jax.models import cnn_blocks
from cnn_jax import config as config_lib
from cnn_jax.config import Config, ConfigError
from cnn_jax.nn.layers import conv_output_size

Params = dict[str, dict[str, jax.Array]]


def walk(config: Config) -> list[tuple[str, tuple[int, ...], float]]:
    """(layer name, per-example output shape, forward FLOPs) of every layer: the one shape walk,
    behind `layer_shapes`, `flops` and `validate`. Raises ConfigError where a kernel or pool
    window does not fit its input. Multiply-add counts 2 FLOPs."""
    h, w, c = config.input_shape
    out: list[tuple[str, tuple[int, ...], float]] = []
    for i, (filters, kernel) in enumerate(zip(config.conv_filters, config.conv_kernels), start=1):
        if config.conv_padding == "VALID" and kernel > min(h, w):
            raise ConfigError(
                f"--conv_kernels: conv{i} kernel {kernel} is larger than its {h}x{w} input; "
                "use smaller kernels, fewer conv layers or --conv_padding=SAME")
        h = conv_output_size(h, kernel, config.conv_stride, config.conv_padding)
        w = conv_output_size(w, kernel, config.conv_stride, config.conv_padding)
        out.append((f"conv{i}", (h, w, filters), 2.0 * h * w * kernel * kernel * c * filters))
        if config.pool_window > min(h, w):
            raise ConfigError(
                f"--pool_window={config.pool_window}: pool{i} window is larger than its {h}x{w} input, "
                "so the flattened size would be zero; use smaller kernels or fewer conv layers")
        h = conv_output_size(h, config.pool_window, config.pool_stride)
        w = conv_output_size(w, config.pool_window, config.pool_stride)
        c = filters
        out.append((f"pool{i}", (h, w, filters), 0.0))
    flat = h * w * c
    out += [("flatten", (flat,), 0.0), ("dense1", (config.num_fc,), 2.0 * flat * config.num_fc),
            ("output", (config.num_classes,), 2.0 * config.num_fc * config.num_classes)]
    return out


def validate(config: Config) -> None:
    """The checks of this family's own fields (conv and pooling, the lowerings of its fused
    blocks, the shape walk); `config.validate` has checked the shared ones."""
    config_lib.check_choice("pool", config.pool, config_lib.POOLS)
    if config.drop_path:
        raise ConfigError(f"--drop_path={config.drop_path!r} is not available for --model=cnn (stochastic depth "
                          "drops residual branches): use --drop_path=0 or --model=resnet")
    config_lib.check_choice("conv_padding", config.conv_padding, config_lib.PADDINGS)
    for name in ("conv_stride", "pool_window", "pool_stride", "num_fc"):
        config_lib.check_positive_int(name, getattr(config, name))
    if config.pool_impl == "reshape" and config.pool_window != config.pool_stride:
        raise ConfigError(f"--pool_impl=reshape needs --pool_window == --pool_stride (got "
                          f"{config.pool_window} and {config.pool_stride}); use --pool_impl=reduce_window")
    if config.conv_impl == "winograd" and (config.layout == "NHWC" or config.pool_impl == "reduce_window"
                                           or config.pool_window != config.pool_stride):
        raise ConfigError("--conv_impl=winograd runs in the fused channel-major block: it needs "
                          "--layout=CHWN (or auto) and reshape pooling (--pool_window == --pool_stride, "
                          "--pool_impl=reshape or auto); use --conv_impl=patches otherwise")
    if config.pool_impl == "onednn":
        raise ConfigError("--pool_impl=onednn is not available for --model=cnn (its fused conv-relu-pool blocks pool "
                          "by reshape or reduce_window): use auto, reshape or reduce_window")
    if not config.conv_filters:
        raise ConfigError("--conv_filters is empty: give one filter count per conv layer, e.g. 20,50")
    if len(config.conv_filters) != len(config.conv_kernels):
        raise ConfigError(
            f"--conv_filters={','.join(map(str, config.conv_filters))} and "
            f"--conv_kernels={','.join(map(str, config.conv_kernels))} differ in length: "
            "give one kernel size per conv layer")
    for name in ("conv_filters", "conv_kernels"):
        values = getattr(config, name)
        if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
            raise ConfigError(f"--{name}={','.join(map(str, values))} is not allowed: "
                              "every entry must be a positive integer")
    walk(config)


def first_conv(params: Params) -> jax.Array:
    """conv1's (kh, kw, in, out) weights: what the filters plot shows."""
    return params["conv1"]["w"]


def param_shapes(config: Config) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shape of every weight and bias, by layer name."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    channels = config.input_shape[2]
    for i, (filters, kernel) in enumerate(zip(config.conv_filters, config.conv_kernels), start=1):
        shapes[f"conv{i}"] = {"w": (kernel, kernel, channels, filters), "b": (filters,)}
        channels = filters
    flat = next(shape for name, shape, _ in walk(config) if name == "flatten")[0]
    shapes["dense1"] = {"w": (flat, config.num_fc), "b": (config.num_fc,)}
    shapes["output"] = {"w": (config.num_fc, config.num_classes), "b": (config.num_classes,)}
    return shapes


def _draws_are_prefixes(key: jax.Array) -> bool:
    """Whether a normal draw of n values is the first n values of any longer draw with the same
    key: true for JAX's default threefry with partitionable counters, where each value depends
    only on the key and its flat index."""
    return str(jax.random.key_impl(key)) == "threefry2x32" and bool(jax.config.jax_threefry_partitionable)


def _normal(key: jax.Array, shape: tuple[int, ...], draw_size: int, prefix_ok: bool) -> jax.Array:
    """Exactly `jax.random.normal(key, shape, float32)`, taken as the prefix of a draw of
    `draw_size` values when that is the same thing: every layer then uses one compiled sampler
    (one per shape would each be compiled on its own)."""
    if not prefix_ok:
        return jax.random.normal(key, shape, jnp.float32)
    return jax.random.normal(key, (draw_size,), jnp.float32)[:math.prod(shape)].reshape(shape)


def init(key: jax.Array, config: Config) -> tuple[Params, dict]:
    """Draw initial params; the model state is empty.

    `init="normal"`: every weight and bias ~ N(0, weight_scale) (the tutorial).
    `init="he"` / `"lecun"`: weights ~ N(0, gain / fan_in) with gain 2 / 1, biases 0.
    """
    params: Params = {}
    shapes = param_shapes(config)
    draw_size = 1 << (max(math.prod(s) for layer in shapes.values() for s in layer.values()) - 1).bit_length()
    normal = functools.partial(_normal, draw_size=draw_size, prefix_ok=_draws_are_prefixes(key))
    keys = jax.random.split(key, 2 * len(shapes))
    for (name, layer), (kw, kb) in zip(shapes.items(), keys.reshape(len(shapes), 2, *keys.shape[1:])):
        w_shape, b_shape = layer["w"], layer["b"]
        if config.init == "normal":
            w = config.weight_scale * normal(kw, w_shape)
            b = config.weight_scale * normal(kb, b_shape)
        else:
            fan_in = math.prod(w_shape[:-1])
            gain = 2.0 if config.init == "he" else 1.0
            w = math.sqrt(gain / fan_in) * normal(kw, w_shape)
            b = jnp.zeros(b_shape, jnp.float32)
        params[name] = {"w": w, "b": b}
    return params, {}


def conv_fn(config: Config):
    """The convolution of the layer-by-layer path (`--debug`, or reduce_window pooling with an
    NHWC layout). The fused blocks of `cnn_jax.nn.lowering`, Winograd among them, do not run there, so
    `auto` means `lowering.resolve`'s choice, with patches + matmul in place of Winograd; `lax`,
    `patches` and `onednn` run as asked."""
    impl = config.conv_impl
    if impl == "auto":
        impl = lowering.resolve(config).conv_impl
        impl = "patches" if impl == "winograd" else impl
    return lowering.nhwc_conv(impl, config.compute_dtype)


def apply(params: Params, model_state: dict, images: jax.Array, config: Config, *, train: bool = False,
          rng: jax.Array | None = None, debug: bool = False) -> tuple[jax.Array, dict]:
    """(logits (N, num_classes), model state) for images (N, H, W, C); the same in training and
    evaluation. `debug` runs the reference layers and prints each layer's output shape."""
    del train, rng   # no batch statistics, no randomness
    conv = conv_fn(config)
    pool = layers.POOLS[config.pool]

    trace = layers.shape_tracer(debug)

    x = images
    strategy = lowering.resolve(config)
    if debug or (strategy.pool_impl == "reduce_window" and strategy.layout == "NHWC"):
        for i in range(1, len(config.conv_filters) + 1):   # the reference, layer by layer
            layer = params[f"conv{i}"]
            x = layers.relu(conv(x, layer["w"], layer["b"], config.conv_stride, config.conv_padding))
            trace(f"conv{i}", x)
            x = pool(x, config.pool_window, config.pool_stride)
            trace(f"pool{i}", x)
    else:  # a faster lowering of the same blocks (cnn_jax/nn/lowering.py; tested equal)
        if strategy.layout == "CHWN":
            x = jnp.transpose(x, (3, 1, 2, 0))   # NHWC <-> CHWN (its own inverse)
        for i in range(1, len(config.conv_filters) + 1):
            layer = params[f"conv{i}"]
            x = cnn_blocks.conv_block(x, layer["w"], layer["b"], config, strategy)
    if strategy.layout == "CHWN" and not debug:   # flatten + dense1 straight from (C, H, W, N)
        x = cnn_blocks.dense_from_chwn(x, params["dense1"]["w"], params["dense1"]["b"], config.compute_dtype)
    else:
        x = layers.flatten(x)
        trace("flatten", x)
        x = layers.dense(x, params["dense1"]["w"], params["dense1"]["b"], config.compute_dtype)
    x = layers.relu(x)
    trace("dense1", x)
    x = layers.dense(x, params["output"]["w"], params["output"]["b"], config.compute_dtype)
    trace("output", x)
    return x, model_state
