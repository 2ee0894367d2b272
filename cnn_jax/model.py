"""The model of a config: the family `config.model` names (`cnn_jax.models`), behind one interface.

The notebook entry point; every caller goes through it, so any registered family trains,
evaluates, plots, sweeps and benchmarks:

    params, model_state = model.init(jax.random.key(0), config)
    logits, model_state = model.apply(params, model_state, images, config, train=False, rng=None)

`images` are (N, H, W, C) float32 in [0, 1]. `model_state` holds what a model updates outside
the gradient (e.g. batch-norm statistics; `{}` for the tutorial's CNN); `apply` returns the new
one, which matters only with `train=True`. `rng` is a key for a model's randomness (dropout),
used only with `train=True`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import jax
import numpy as np

from cnn_jax import config as config_lib
from cnn_jax import models
from cnn_jax.config import Config, ConfigError
from cnn_jax.nn import lowering

Params = dict[str, Any]
ModelState = dict[str, Any]


def family(config: Config) -> ModuleType:
    """The module of `config.model`'s family; ConfigError (one line) for an unknown name."""
    try:
        return models.family(config.model)
    except KeyError:
        raise ConfigError(f"--model={config.model!r} is not allowed: use one of {', '.join(models.names())} "
                          f"(a family of your own: set ${models.PLUGINS_ENV}=name=module)") from None


def init(key: jax.Array, config: Config) -> tuple[Params, ModelState]:
    """(params, model state) drawn from `key`."""
    return family(config).init(key, config)


def apply(params: Params, model_state: ModelState, images: jax.Array, config: Config, *,
          train: bool = False, rng: jax.Array | None = None) -> tuple[jax.Array, ModelState]:
    """(logits (N, num_classes), new model state) for `images` (N, H, W, C)."""
    return family(config).apply(params, model_state, images, config, train=train, rng=rng)


def layer_shapes(config: Config) -> list[tuple[str, tuple[int, ...]]]:
    """(layer name, per-example output shape) of every layer, for --debug."""
    return [(name, shape) for name, shape, _ in family(config).walk(config)]


def format_layer_shapes(config: Config) -> str:
    """The --debug shape trace: one `name  HxWxC` line per layer."""
    return "\n".join(f"{name:8s} {'x'.join(map(str, shape))}" for name, shape in layer_shapes(config))


def flops(config: Config) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per training image, from the family's shape walk of
    (layer, shape, forward FLOPs): backward = weight gradients + input gradients of all but the
    first layer, as the benchmark counts them for every family."""
    per_layer = [f for _, _, f in family(config).walk(config) if f]
    forward = sum(per_layer)
    return forward, forward + forward + (forward - per_layer[0])


def validate(config: Config) -> Config:
    """The full check of a config: `config.validate` (what every family shares), the `model`
    name, then the family's checks of its own fields. Returns the config unchanged or raises
    ConfigError (one line). Composed here because `config` imports nothing above it."""
    config_lib.validate(config)
    config_lib.check_choice("model", config.model, models.names())
    family(config).validate(config)
    return config


def strategy(config: Config) -> lowering.Strategy:
    """The lowerings the config's family runs (for the start-up `strategy:` line): the family's
    `strategy` when it has one, else `lowering.resolve` (the tutorial network's fused blocks)."""
    module = family(config)
    if hasattr(module, "strategy"):
        return module.strategy(config)
    return lowering.resolve(config)


def inference_config(config: Config) -> Config:
    """The config evaluation runs (its `auto` lowerings set for the forward pass alone): the
    family's `inference_config` when it has one, else `lowering.inference_config`."""
    module = family(config)
    if hasattr(module, "inference_config"):
        return module.inference_config(config)
    return lowering.inference_config(config)


def first_conv(params: Params, config: Config) -> np.ndarray:
    """The first conv layer's (kh, kw, in, out) weights, for the filters plot: the family's
    `first_conv` when it has one, else the first 4-D weight in layer order."""
    module = family(config)
    if hasattr(module, "first_conv"):
        return np.asarray(module.first_conv(params))
    for leaf in jax.tree.leaves(params):
        if np.ndim(leaf) == 4:
            return np.asarray(leaf)
    raise ValueError(f"model {config.model!r} has no 4-D (conv) weight to plot")
