"""The model registry: each family is a module with the same four functions, found by name.

A family module provides

    init(key, config) -> (params, model_state)          # model_state: {} for stateless models
    apply(params, model_state, images, config, *, train, rng) -> (logits, new model_state)
    walk(config) -> [(layer name, per-example output shape, forward FLOPs), ...]   # the shape walk
    validate(config) -> None                            # its own checks; raises ConfigError

(`cnn_jax.model` derives the --debug shape trace and the FLOPs per training image from `walk`)

and may provide `first_conv(params)`, the first conv layer's (kh, kw, in, out) weights for the
filters plot (default: the first 4-D weight in layer order), and `strategy(config)`, the
`lowering.Strategy` it runs, for the start-up `strategy:` line (default: `lowering.resolve`, what
the tutorial's fused blocks run), and `inference_config(config)`, the config evaluation runs
(default: `lowering.inference_config`). `config.model` names the family.

Built-in families are listed in `FAMILIES` (name -> module path), imported on first use like
big_vision's `importlib.import_module(f"...models.{name}")`. A family kept outside the package
is registered with `register(name, "my_package.my_module")` in Python, or, for the scripts, with
the environment variable `CNN_JAX_MODELS="name=my_package.my_module,..."` (the module must be
importable, e.g. on PYTHONPATH). This module imports nothing from cnn_jax.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

# name -> module path of the built-in families.
FAMILIES: dict[str, str] = {
    "cnn": "cnn_jax.models.cnn",   # the MXNet tutorial's network: conv -> relu -> pool blocks, two dense layers
    "vgg": "cnn_jax.models.vgg",   # blocks of [conv -> batch norm -> relu] x depth, max pooling, dropout
    "resnet": "cnn_jax.models.resnet",   # a small pre-activation ResNet for 28x28 and 32x32 inputs
}
PLUGINS_ENV = "CNN_JAX_MODELS"
_plugins: dict[str, str] = {}


def register(name: str, module: str) -> None:
    """Make family `name` (the module at import path `module`) selectable with --model=name."""
    if not name.isidentifier():
        raise ValueError(f"model family name {name!r} must be a Python identifier")
    _plugins[name] = module


def unregister(name: str) -> None:
    """Undo `register(name, ...)` (a family registered for a while, e.g. by a test module)."""
    _plugins.pop(name, None)


def _env_plugins() -> dict[str, str]:
    """The families named in $CNN_JAX_MODELS (`name=module,...`)."""
    out = {}
    for entry in filter(None, (e.strip() for e in os.environ.get(PLUGINS_ENV, "").split(","))):
        name, sep, module = entry.partition("=")
        if not sep or not name.strip().isidentifier() or not module.strip():
            raise ValueError(f"${PLUGINS_ENV}: {entry!r} is not name=module (e.g. tiny=my_models.tiny)")
        out[name.strip()] = module.strip()
    return out


def paths() -> dict[str, str]:
    """Every selectable family: built-in, registered in Python, named in $CNN_JAX_MODELS."""
    return {**FAMILIES, **_env_plugins(), **_plugins}


def names() -> tuple[str, ...]:
    """The family names, built-in ones first."""
    return tuple(paths())


def family(name: str) -> ModuleType:
    """The module of family `name`; KeyError for an unknown name."""
    return importlib.import_module(paths()[name])
