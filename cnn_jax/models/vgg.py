"""A VGG-style network (`--model=vgg`): a family of `cnn_jax.models`.

For each block b with `widths[b]` channels: `depth` times [3x3 conv (SAME, no bias) -> batch
norm -> relu], then 2x2 max pooling; then flatten -> dropout (`--dropout`, training only) ->
output (logits). Batch norm uses the batch's statistics in training and its running averages
(the model state, moved with `--bn_momentum`) in evaluation. Params and model state are nested
dicts keyed by layer name: params {"conv1_1": {"w"}, "bn1_1": {"scale", "bias"}, ..., "output":
{"w", "b"}}, model state {"bn1_1": {"mean", "var"}, ...}. Convolutions run as patches + matmul
on CPU (`models.common`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cnn_jax.nn import layers, lowering
from cnn_jax.config import Config, ConfigError
from cnn_jax.models import common

Params = dict[str, dict[str, jax.Array]]


def walk(config: Config) -> list[tuple[str, tuple[int, ...], float]]:
    """(layer name, per-example output shape, forward FLOPs) of every layer (multiply-add: 2 FLOPs).
    Raises ConfigError where pooling leaves no pixels."""
    h, w, c = config.input_shape
    out: list[tuple[str, tuple[int, ...], float]] = []
    for b, width in enumerate(config.widths, start=1):
        for j in range(1, config.depth + 1):
            out.append((f"conv{b}_{j}", (h, w, width), 2.0 * h * w * 9 * c * width))
            c = width
        if min(h, w) < 2:
            raise ConfigError(f"--widths={','.join(map(str, config.widths))}: {len(config.widths)} blocks pool "
                              f"the {config.input_shape[0]}x{config.input_shape[1]} input below 1x1; "
                              "give fewer widths (one 2x2 pooling per block)")
        h, w = h // 2, w // 2
        out.append((f"pool{b}", (h, w, c), 0.0))
    flat = h * w * c
    out += [("flatten", (flat,), 0.0), ("output", (config.num_classes,), 2.0 * flat * config.num_classes)]
    return out


def validate(config: Config) -> None:
    """The checks of this family's fields (widths, depth, dropout, bn_momentum) and its shape walk."""
    common.validate(config, "vgg")
    walk(config)


def strategy(config: Config) -> lowering.Strategy:
    """What runs, for the start-up `strategy:` line."""
    return common.strategy(config, common.pool_impl(config))


def inference_config(config: Config) -> Config:
    """The config evaluation runs (`common.inference_config`: oneDNN where training runs it)."""
    return common.inference_config(config)


def first_conv(params: Params) -> jax.Array:
    """conv1_1's (3, 3, in, out) weights: what the filters plot shows."""
    return params["conv1_1"]["w"]


def init(key: jax.Array, config: Config) -> tuple[Params, dict]:
    """Conv weights as `--init` says (`common.weight`; he: N(0, 2 / fan_in)), batch norm at scale 1
    and bias 0 (running mean 0, variance 1), the output layer at gain 1 with zero bias."""
    params: Params = {}
    model_state: dict = {}
    c = config.input_shape[2]
    index = 0
    for b, width in enumerate(config.widths, start=1):
        for j in range(1, config.depth + 1):
            params[f"conv{b}_{j}"] = {"w": common.weight(jax.random.fold_in(key, index), (3, 3, c, width),
                                                         config)}
            params[f"bn{b}_{j}"], model_state[f"bn{b}_{j}"] = common.bn_init(width)
            c, index = width, index + 1
    flat = next(shape for name, shape, _ in walk(config) if name == "flatten")[0]
    params["output"] = {"w": common.weight(jax.random.fold_in(key, index), (flat, config.num_classes), config,
                                           gain=1.0),
                        "b": jnp.zeros(config.num_classes, jnp.float32)}
    return params, model_state


def apply(params: Params, model_state: dict, images: jax.Array, config: Config, *, train: bool = False,
          rng: jax.Array | None = None, debug: bool = False) -> tuple[jax.Array, dict]:
    """(logits (N, num_classes), model state) for images (N, H, W, C): in training with batch
    statistics (returning the moved running averages) and dropout drawn from `rng`; in evaluation
    with the running averages (returned unchanged) and no dropout. `debug` prints each layer's
    output shape."""
    conv = common.conv_fn(config)

    trace = layers.shape_tracer(debug)

    new_state: dict = {}
    x = images
    for b in range(1, len(config.widths) + 1):
        for j in range(1, config.depth + 1):
            x = conv(x, params[f"conv{b}_{j}"]["w"], 0.0, 1, "SAME")
            x, new_state[f"bn{b}_{j}"] = common.bn(x, params[f"bn{b}_{j}"], model_state[f"bn{b}_{j}"], config, train)
            x = layers.relu(x)
            trace(f"conv{b}_{j}", x)
        x = common.max_pool_2x2(x, config)
        trace(f"pool{b}", x)
    x = layers.flatten(x)
    trace("flatten", x)
    x = layers.dropout(x, config.dropout, rng, train=train)
    x = layers.dense(x, params["output"]["w"], params["output"]["b"], config.compute_dtype)
    trace("output", x)
    return x, (new_state if train else model_state)
