"""What the batch-normalised families (`vgg`, `resnet`) share: their convolution lowering and the
strategy line that names it, weight initialisation, batch norm on params and model state, and
the checks of their config fields.

Batch norm sits between each convolution and its relu, so the fused conv -> relu -> pool blocks
of `cnn_jax.nn.lowering` do not apply; each convolution runs on its own: on CPU through oneDNN
(`cnn_jax.nn.onednn`, faster than XLA:CPU's convolution: docs/performance.md) when it builds there, else as
patches + one matmul (`layers.conv2d_patches`); as XLA's convolution elsewhere or with
`--conv_impl=lax`. Activations stay NHWC.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from cnn_jax.nn import layers, lowering, onednn
from cnn_jax.config import Config, ConfigError

Conv = Callable[..., jax.Array]


def conv_impl(config: Config, backend: str | None = None) -> str:
    """The convolution that runs: the one asked for; `auto` is `onednn` on CPU where it builds
    (`onednn.available`), else `patches`, and `lax` off CPU. Asking for `onednn` builds and registers
    it now (a one-line ConfigError where it cannot), before any cached program needs it."""
    impl = config.conv_impl
    cpu = (backend or jax.default_backend()) == "cpu"
    if impl == "auto":
        impl = ("onednn" if onednn.available() else "patches") if cpu else "lax"
    if impl == "onednn":
        onednn.require("conv_impl", "auto or lax", backend)
    return impl


def conv_fn(config: Config) -> Conv:
    """conv(x, w, b, stride, padding) of the config's lowering."""
    return lowering.nhwc_conv(conv_impl(config), config.compute_dtype)


def pool_impl(config: Config) -> str:
    """The 2x2 max pooling that runs: the one asked for; `auto` is `onednn` with oneDNN's
    convolutions, else `reshape` (its custom gradient is faster on XLA:CPU than `reduce_window`'s;
    the three are tested equal in tests/test_lowering.py and tests/test_onednn.py)."""
    if config.pool_impl == "auto":
        return "onednn" if conv_impl(config) == "onednn" else "reshape"
    if config.pool_impl == "onednn":
        onednn.require("pool_impl", "auto or reshape")
    return config.pool_impl


def max_pool_2x2(x: jax.Array, config: Config) -> jax.Array:
    """2x2 max pooling at stride 2 (VALID) in the config's lowering."""
    impl = pool_impl(config)
    if impl == "reduce_window":
        return layers.max_pool(x, 2, 2)
    if impl == "onednn":
        # In the compute dtype: rounding is monotone, so pool(round(x)) == round(pool(x)), the input
        # the next convolution takes anyway, read and written at half the bytes.
        return onednn.max_pool(layers.compute_cast(x, config.compute_dtype), 2)
    return lowering.max_pool_reshape(x, 2)


def strategy(config: Config, pool: str) -> lowering.Strategy:
    """What these families run, for the start-up `strategy:` line: their conv lowering, `pool`
    (what the family pools with), NHWC, and the loop and YNNPACK choices of `lowering.resolve`."""
    base = lowering.resolve(config)
    return lowering.Strategy(conv_impl(config), pool, "NHWC", base.loop, base.ynnpack, config.compute_dtype)


def inference_config(config: Config) -> Config:
    """The config evaluation runs: unchanged where these families train with oneDNN (its forward pass
    runs faster than XLA:CPU's convolution, in float32 and far more in bfloat16: docs/lowering.md),
    else `lowering.inference_config` (XLA's convolution, faster forward than patches + matmul)."""
    return config if conv_impl(config) == "onednn" else lowering.inference_config(config)


def weight(key: jax.Array, shape: tuple[int, ...], config: Config, gain: float = 2.0) -> jax.Array:
    """Initial weights of `shape` (fan_in: every axis but the last) as `--init` says: N(0, gain /
    fan_in) for `he` (gain 2 for a layer followed by relu; pass 1 for the classifier), N(0, 1 /
    fan_in) for `lecun`, N(0, weight_scale) for `normal`."""
    normal = jax.random.normal(key, shape, jnp.float32)
    if config.init == "normal":
        return config.weight_scale * normal
    gain = gain if config.init == "he" else 1.0
    return math.sqrt(gain / math.prod(shape[:-1])) * normal


def bn_init(channels: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """(params, model state) of a fresh batch norm: scale 1, bias 0; running mean 0, variance 1."""
    return ({"scale": jnp.ones(channels, jnp.float32), "bias": jnp.zeros(channels, jnp.float32)},
            {"mean": jnp.zeros(channels, jnp.float32), "var": jnp.ones(channels, jnp.float32)})


def bn(x: jax.Array, params: dict, state: dict, config: Config, train: bool) -> tuple[jax.Array, dict]:
    """`layers.batch_norm` with its params and running averages: (y, new running averages)."""
    y, mean, var = layers.batch_norm(x, params["scale"], params["bias"], state["mean"], state["var"],
                                     train=train, momentum=config.bn_momentum)
    return y, {"mean": mean, "var": var}


def validate(config: Config, family: str) -> None:
    """The checks of the fields these families share (widths, depth, dropout, bn_momentum, lowering)."""
    if not config.widths or any(w <= 0 for w in config.widths):
        raise ConfigError(f"--widths={','.join(map(str, config.widths))} is not allowed for --model={family}: "
                          "give one positive channel count per block or stage, e.g. 32,64,128")
    if isinstance(config.depth, bool) or not isinstance(config.depth, int) or config.depth <= 0:
        raise ConfigError(f"--depth={config.depth!r} is not allowed: it must be a positive integer")
    if config.drop_path and family != "resnet":
        raise ConfigError(f"--drop_path={config.drop_path!r} is not available for --model={family} (stochastic "
                          "depth drops residual branches): use --drop_path=0 or --model=resnet")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"--dropout={config.dropout!r} is not allowed: it must be in [0, 1)")
    if not 0.0 <= config.bn_momentum < 1.0:
        raise ConfigError(f"--bn_momentum={config.bn_momentum!r} is not allowed: it must be in [0, 1)")
    if config.conv_impl == "winograd":
        raise ConfigError(f"--conv_impl=winograd is not available for --model={family} (batch norm sits between "
                          "conv and relu, outside the fused Winograd block): use auto, patches or lax")
    if config.layout == "CHWN":
        raise ConfigError(f"--layout=CHWN is not available for --model={family}: use auto or NHWC")

