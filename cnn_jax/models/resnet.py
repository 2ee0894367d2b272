"""A small pre-activation ResNet (`--model=resnet`) for 28x28 and 32x32 inputs: a family of
`cnn_jax.models`.

stem (3x3 conv, `widths[0]` channels) -> stages s = 1.. of `depth` pre-activation basic blocks
with `widths[s]` channels (the first block of every stage but the first halves the size with
stride 2) -> batch norm -> relu -> global average pooling -> dropout (`--dropout`, training
only) -> output. A block computes

    h = relu(bn1(x));  y = conv2(relu(bn2(conv1(h, stride))));  out = drop_path(y) + shortcut

where the shortcut is x, or a strided 1x1 projection of h when the shape changes (He et al.,
"Identity Mappings in Deep Residual Networks", 2016), and drop_path the identity unless
`--drop_path` (stochastic depth, in training) drops the branch of some examples. Convolutions
are SAME without bias and run as patches + matmul on CPU (`models.common`). Params: {"stem":
{"w"}, "stage1_block1": {"bn1", "conv1", "bn2", "conv2", ["proj"]}, ..., "final_bn", "output"};
the model state holds the batch norms' running averages under the same names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cnn_jax.nn import layers, lowering
from cnn_jax.config import Config, ConfigError
from cnn_jax.nn.layers import conv_output_size
from cnn_jax.models import common

Params = dict[str, dict]
# Block b's stochastic-depth draws use fold_in(fold_in(rng, DROP_PATH_STREAM), b), apart from the
# dropout before the classifier, which uses `rng` itself.
DROP_PATH_STREAM = 0xD9


def drop_path_rates(config: Config) -> list[float]:
    """Each block's stochastic-depth rate: rising linearly to `--drop_path` at the last block,
    rate * b / L for block b = 1..L (Huang et al. 2016's linear decay rule)."""
    blocks = len(config.widths) * config.depth
    return [config.drop_path * b / blocks for b in range(1, blocks + 1)]


def _blocks(config: Config):
    """(name, in channels, out channels, stride) of every residual block, in order."""
    c = config.widths[0]
    for s, width in enumerate(config.widths, start=1):
        for b in range(1, config.depth + 1):
            stride = 2 if s > 1 and b == 1 else 1
            yield f"stage{s}_block{b}", c, width, stride
            c = width


def walk(config: Config) -> list[tuple[str, tuple[int, ...], float]]:
    """(layer name, per-example output shape, forward FLOPs) of every layer (multiply-add: 2 FLOPs)."""
    h, w, c = config.input_shape
    out = [("stem", (h, w, config.widths[0]), 2.0 * h * w * 9 * c * config.widths[0])]
    for name, cin, cout, stride in _blocks(config):
        if stride > 1 and min(h, w) < 2:
            raise ConfigError(f"--widths={','.join(map(str, config.widths))}: {len(config.widths)} stages halve "
                              f"the {config.input_shape[0]}x{config.input_shape[1]} input below 1x1; give fewer widths")
        h, w = conv_output_size(h, 3, stride, "SAME"), conv_output_size(w, 3, stride, "SAME")
        f = 2.0 * h * w * 9 * (cin * cout + cout * cout)
        if stride != 1 or cin != cout:
            f += 2.0 * h * w * cin * cout
        out.append((name, (h, w, cout), f))
    c = config.widths[-1]
    out += [("pool", (c,), 0.0), ("output", (config.num_classes,), 2.0 * c * config.num_classes)]
    return out


def validate(config: Config) -> None:
    """The checks of this family's fields (widths, depth, dropout, bn_momentum, drop_path: `config.validate`)
    and its shape walk."""
    common.validate(config, "resnet")
    walk(config)


def strategy(config: Config) -> lowering.Strategy:
    """What runs, for the start-up `strategy:` line (the only pooling is the global mean)."""
    return common.strategy(config, "global_mean")


def inference_config(config: Config) -> Config:
    """The config evaluation runs (`common.inference_config`: oneDNN where training runs it)."""
    return common.inference_config(config)


def first_conv(params: Params) -> jax.Array:
    """The stem's (3, 3, in, out) weights: what the filters plot shows."""
    return params["stem"]["w"]


def init(key: jax.Array, config: Config) -> tuple[Params, dict]:
    """Conv weights as `--init` says (`common.weight`; he: N(0, 2 / fan_in)), batch norm at scale 1
    and bias 0 (running mean 0, variance 1), the output layer at gain 1 with zero bias."""
    keys = iter(jax.random.split(key, 3 * len(config.widths) * config.depth + 2))
    stem_shape = (3, 3, config.input_shape[2], config.widths[0])
    params: Params = {"stem": {"w": common.weight(next(keys), stem_shape, config)}}
    model_state: dict = {}
    for name, cin, cout, stride in _blocks(config):
        block, block_state = {}, {}
        block["bn1"], block_state["bn1"] = common.bn_init(cin)
        block["conv1"] = {"w": common.weight(next(keys), (3, 3, cin, cout), config)}
        block["bn2"], block_state["bn2"] = common.bn_init(cout)
        block["conv2"] = {"w": common.weight(next(keys), (3, 3, cout, cout), config)}
        projection_key = next(keys)
        if stride != 1 or cin != cout:
            block["proj"] = {"w": common.weight(projection_key, (cin, cout), config)}
        params[name], model_state[name] = block, block_state
    params["final_bn"], model_state["final_bn"] = common.bn_init(config.widths[-1])
    output_shape = (config.widths[-1], config.num_classes)
    params["output"] = {"w": common.weight(next(keys), output_shape, config, gain=1.0),
                        "b": jnp.zeros(config.num_classes, jnp.float32)}
    return params, model_state


def block(p: dict, s: dict, x: jax.Array, config: Config, stride: int, *, train: bool, drop_rate: float = 0.0,
          rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """One pre-activation block (the module docstring's formula): (output, its batch norms' state).
    In training its residual branch is dropped per example at `drop_rate` (`layers.drop_path`)."""
    conv = common.conv_fn(config)
    h, s_bn1 = common.bn(x, p["bn1"], s["bn1"], config, train)
    h = layers.relu(h)
    y = conv(h, p["conv1"]["w"], 0.0, stride, "SAME")
    y, s_bn2 = common.bn(y, p["bn2"], s["bn2"], config, train)
    y = conv(layers.relu(y), p["conv2"]["w"], 0.0, 1, "SAME")
    y = layers.drop_path(y, drop_rate, rng, train=train)
    if "proj" in p:   # the shape changes: project the pre-activated input
        return layers.residual_add(y, h, p["proj"]["w"], stride, config.compute_dtype), {"bn1": s_bn1, "bn2": s_bn2}
    return layers.residual_add(y, x), {"bn1": s_bn1, "bn2": s_bn2}


def apply(params: Params, model_state: dict, images: jax.Array, config: Config, *, train: bool = False,
          rng: jax.Array | None = None, debug: bool = False) -> tuple[jax.Array, dict]:
    """(logits (N, num_classes), model state) for images (N, H, W, C): in training with batch
    statistics (returning the moved running averages), dropout and stochastic depth drawn from
    `rng`; in evaluation with the running averages (returned unchanged), every branch and no
    dropout. `debug` prints each layer's output shape."""
    conv, trace = common.conv_fn(config), layers.shape_tracer(debug)
    new_state: dict = {}
    x = conv(images, params["stem"]["w"], 0.0, 1, "SAME")
    trace("stem", x)
    rates = drop_path_rates(config)
    for index, (name, _, _, stride) in enumerate(_blocks(config)):
        x, new_state[name] = block(params[name], model_state[name], x, config, stride, train=train,
                                   drop_rate=rates[index] if train else 0.0,
                                   rng=jax.random.fold_in(jax.random.fold_in(rng, DROP_PATH_STREAM), index)
                                   if train and config.drop_path else None)
        trace(name, x)
    x, new_state["final_bn"] = common.bn(x, params["final_bn"], model_state["final_bn"], config, train)
    x = layers.global_avg_pool(layers.relu(x))
    trace("pool", x)
    x = layers.dropout(x, config.dropout, rng, train=train)
    x = layers.dense(x, params["output"]["w"], params["output"]["b"], config.compute_dtype)
    trace("output", x)
    return x, (new_state if train else model_state)
