"""The one experiment config: every knob, its defaults, the named presets, validation.

`Config` is a frozen dataclass; a preset is just another value of it
(`PRESETS["tutorial"]` is the MXNet tutorial's recipe). `validate` is the single
place where values are checked; it raises `ConfigError` with a one-line message
naming the flag, the value and what is allowed. Names that were renamed
(`RENAMED_PRESETS`, `RENAMED_VALUES`) are errors naming the new one when given, and are
migrated when read from a run's config.json (`from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cnn_jax import models

from cnn_jax.data import registry as datasets
from cnn_jax.nn.layers import PADDINGS

DATASETS = datasets.NAMES
INITS = ("he", "lecun", "normal")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle", "warmup_cosine")
LOSS_REDUCTIONS = ("mean", "sum")
CONV_IMPLS = ("auto", "lax", "patches", "winograd", "onednn")
POOL_IMPLS = ("auto", "reduce_window", "reshape", "onednn")
LAYOUTS = ("auto", "NHWC", "CHWN")
YNNPACK = ("auto", "on", "off")
LOOPS = ("auto", "step", "scan")
TRAIN_EVALS = ("full", "running")


class ConfigError(ValueError):
    """A config value is invalid; the message is one line meant for the user."""


# Integer fields and list entries stay below 2**31: JAX takes them as int32 (shapes, seeds).
MAX_INT = 2**31 - 1


def shown(value: Any, limit: int = 60, quote: bool = True) -> str:
    """`repr(value)` (or `str` with `quote=False`) on one line, cut to `limit` characters: for messages."""
    try:
        text = repr(value) if quote else " ".join(str(value).split())
    except (ValueError, RecursionError):   # an int of more digits than Python prints, a deep list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of an experiment; `experiments/train.py` has one flag per field."""

    # Data.
    dataset: str = "mnist"            # mnist | fashion_mnist | kmnist | cifar10 | cifar100 (cnn_jax.data.registry)
    data_dir: str = ""                # folder with the dataset's offline files; empty: searched (cnn_jax.data)
    train_subset: int = 0             # train on the first N images only (0: all)
    test_subset: int = 0              # evaluate on the first N test images only (0: all)
    augment_shift: int = 0            # training images shifted by up to N pixels (pad and crop; 0: off)
    augment_flip: bool = False        # training images mirrored left-right at random (off for digits)
    # Model: the family (cnn_jax.models), then the fields of the tutorial's CNN.
    model: str = "cnn"                # a family of cnn_jax.models (cnn: the tutorial's network)
    conv_filters: tuple[int, ...] = (20, 50)
    conv_kernels: tuple[int, ...] = (3, 5)
    conv_stride: int = 1
    conv_padding: str = "VALID"       # VALID | SAME
    pool: str = "max"                 # max | avg
    pool_window: int = 2
    pool_stride: int = 2
    num_fc: int = 128                 # width of the hidden dense layer
    num_classes: int = 10             # follows `dataset` in `replace` unless given
    input_shape: tuple[int, int, int] = (28, 28, 1)   # H, W, C; follows `dataset` in `replace` unless given
    init: str = "he"                  # he | lecun | normal (every weight and bias ~ N(0, weight_scale))
    weight_scale: float = 0.01        # std of the normal init
    # Fields of the batch-normalised families (vgg, resnet).
    widths: tuple[int, ...] = (32, 64, 128)   # channels of each VGG block / ResNet stage
    depth: int = 2                    # conv layers per VGG block / residual blocks per ResNet stage
    dropout: float = 0.0              # dropout rate before the classifier (0: none)
    bn_momentum: float = 0.9          # batch norm: running average <- momentum * running + (1 - momentum) * batch
    # Optimisation.
    optimizer: str = "adam"           # sgd | momentum | adam | adamw
    learning_rate: float = 1e-3
    schedule: str = "constant"        # constant | cosine | onecycle | warmup_cosine (optax optimisers)
    momentum: float = 0.9
    weight_decay: float = 1e-4        # adamw only
    ema_decay: float = 0.0            # evaluate an exponential moving average of the params with this decay (0: off)
    loss_reduction: str = "mean"      # mean | sum (the tutorial sums the per-example loss over the batch)
    batch_size: int = 64
    epochs: int = 1
    seed: int = 0
    # Execution and reporting.
    # auto | lax | patches | winograd. auto on CPU: in the tutorial CNN's fused conv -> relu -> pool
    # blocks Winograd where it applies, else patches; where a convolution runs alone (vgg, resnet,
    # --debug, reduce_window pooling with NHWC) patches. auto elsewhere: lax (cnn_jax.nn.lowering.resolve).
    conv_impl: str = "auto"
    loop: str = "auto"                # auto | step (one jitted step per batch) | scan (epoch in lax.scan)
    pool_impl: str = "auto"           # auto | reduce_window (reference) | reshape (window == stride only)
    layout: str = "auto"              # auto | NHWC (reference) | CHWN (channel-major, batch-minor)
    ynnpack: str = "auto"             # auto | on | off: XLA:CPU's YNNPACK fusions (auto: off on CPU)
    # Multi-host data parallelism (jax.distributed); empty address: this process alone.
    coordinator_address: str = ""     # host:port of process 0
    num_processes: int = 1
    process_id: int = 0
    eval_batch_size: int = 1000
    train_eval: str = "full"          # full: evaluate the whole train set per epoch | running: during the epoch
    loss_smoothing: float = 0.01      # rate of the tutorial's moving-average loss
    log_every: int = 100              # steps between logged training losses
    debug: bool = False               # print every layer's output shape


PRESETS: dict[str, Config] = {
    "default": Config(),
    # The MXNet tutorial exactly: N(0, 0.01) init, plain SGD (p <- p - lr * grad) at lr 0.01 on
    # the summed loss, average pooling, batch 64, one epoch.
    "tutorial": Config(pool="avg", init="normal", weight_scale=0.01, optimizer="sgd",
                       learning_rate=0.01, loss_reduction="sum"),
    # >= 0.99 test accuracy on every seed in the least wall time (docs/recipes.md,
    # docs/performance.md): the tutorial's network with max pooling, He init, Adam with a one-cycle
    # schedule peaking at 0.006, batch 64, two epochs (one epoch lands on the 0.99 line, some seeds
    # and CPUs below it; the second clears it with margin), the training accuracy taken during the
    # epoch instead of in an extra pass, and evaluation in batches of 250 (XLA:CPU's forward pass is
    # fastest there).
    "fast": Config(pool="max", init="he", optimizer="adam", learning_rate=0.006, schedule="onecycle",
                   batch_size=64, epochs=2, train_eval="running", eval_batch_size=250),
    # The batch-normalised families: Adam with a one-cycle schedule, shifts of up to 2 pixels. vgg is
    # MNIST's recipe, chosen on a validation split carved from the training set (docs/recipes.md:
    # 10 epochs; peak learning rate 0.003 against 0.006, tied on validation accuracy, lower
    # validation loss). resnet is a starting point, NOT YET TUNED.
    "vgg": Config(model="vgg", widths=(32, 64, 128), depth=2, dropout=0.3, bn_momentum=0.9, init="he",
                  optimizer="adam", learning_rate=0.003, schedule="onecycle", batch_size=128, epochs=10,
                  augment_shift=2, train_eval="running", eval_batch_size=500),
    "resnet": Config(model="resnet", widths=(16, 32, 64), depth=2, dropout=0.0, bn_momentum=0.9, init="he",
                     optimizer="adam", learning_rate=0.003, schedule="onecycle", batch_size=128, epochs=5,
                     augment_shift=2, train_eval="running", eval_batch_size=500),
}
# Fashion-MNIST's recipe: vgg's, with left-right flips (clothes, unlike digits, keep their class when
# mirrored) instead of shifts: chosen on a validation split against shifts of 1 and 2 pixels with
# flips (docs/recipes.md).
PRESETS["vgg_fashion"] = dataclasses.replace(PRESETS["vgg"], dataset="fashion_mnist", augment_shift=0,
                                             augment_flip=True)

# Names that were renamed, old -> new: presets, and values of config fields. Given on the command
# line or in a sweep or search spec, an old name is a one-line error naming the new one; in a run's
# config.json it is migrated on read (`from_dict`), so runs written before still resume and evaluate.
# (`seed_sgd` was the tutorial's hand-written SGD, p <- p - lr * grad: optax's sgd computes exactly that.)
RENAMED_PRESETS: dict[str, str] = {"seed": "tutorial"}
RENAMED_VALUES: dict[str, dict[str, str]] = {"init": {"seed": "normal"}, "optimizer": {"seed_sgd": "sgd"}}
_RENAME_HINTS = {("optimizer", "seed_sgd"): " (the tutorial's recipe adds --loss_reduction=sum, as --preset=tutorial does)"}


def check_renamed(name: str, value: Any, where: str = "") -> None:
    """Raise a one-line ConfigError naming the new name if `value` of `name` (`preset` or a config
    field) was renamed; `where` (e.g. `--sweep`) prefixes the message and drops the flags' `--`."""
    renames = RENAMED_PRESETS if name == "preset" else RENAMED_VALUES.get(name, {})
    if isinstance(value, str) and value in renames:
        dashes, prefix = ("", f"{where}: ") if where else ("--", "")
        raise ConfigError(f"{prefix}{dashes}{name}={value} was renamed: use {dashes}{name}={renames[value]}"
                          + _RENAME_HINTS.get((name, value), ""))


def preset(name: str) -> Config:
    """The preset `name`; a renamed or unknown name is a one-line ConfigError."""
    check_renamed("preset", name)
    if name not in PRESETS:
        raise ConfigError(f"--preset={shown(name)} is not allowed: use one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


# The headings the experiment scripts' `--helpshort` lists the config flags under (cnn_jax.cli):
# every Config field, `--preset` and the compilation cache's flags, each in one group.
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("dataset", "data_dir", "train_subset", "test_subset", "augment_shift", "augment_flip"),
    "model": ("model", "conv_filters", "conv_kernels", "conv_stride", "conv_padding", "pool", "pool_window",
              "pool_stride", "num_fc", "num_classes", "input_shape", "init", "weight_scale", "widths", "depth",
              "dropout", "bn_momentum"),
    "optimisation": ("optimizer", "learning_rate", "schedule", "momentum", "weight_decay", "ema_decay", "loss_reduction",
                     "batch_size", "epochs", "seed"),
    "execution": ("conv_impl", "loop", "pool_impl", "layout", "ynnpack", "coordinator_address", "num_processes",
                  "process_id", "eval_batch_size", "compilation_cache", "compilation_cache_dir"),
    "run": ("preset", "train_eval", "loss_smoothing", "log_every", "debug"),
}


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config))


def _names(names: list[str]) -> list[str]:
    """Field names for messages: a name that is not an identifier is quoted (on one line)."""
    return [n if n.isidentifier() else shown(n, 30) for n in names[:5]] + (["..."] if len(names) > 5 else [])


def replace(config: Config, **overrides: Any) -> Config:
    """`dataclasses.replace` that names an unknown field in a ConfigError.

    A new `dataset` brings its image shape and class count from the registry, unless
    `input_shape` or `num_classes` are given too."""
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(_names(unknown))}; known: {', '.join(field_names())}")
    name = overrides.get("dataset", config.dataset)
    if name != config.dataset and name in datasets.REGISTRY:
        spec = datasets.get(name)
        overrides = {"input_shape": spec.image_shape, "num_classes": spec.num_classes, **overrides}
    return dataclasses.replace(config, **overrides)


def to_dict(config: Config) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def migrate(values: dict[str, Any]) -> dict[str, Any]:
    """Config values as an earlier version wrote them (a run's config.json), renamed values
    replaced by their new names (`RENAMED_VALUES`)."""
    return {k: RENAMED_VALUES.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in values.items()}


def from_dict(values: dict[str, Any]) -> Config:
    """Inverse of `to_dict`, reading what earlier versions wrote too (`migrate`); unknown keys are an error."""
    values = migrate(values)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(_names(unknown))}")
    lists = {f.name for f in fields.values() if isinstance(f.default, tuple)}
    return Config(**{k: tuple(v) if k in lists and isinstance(v, list) else v for k, v in values.items()})


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    check_renamed(name, value)
    if value not in allowed:
        raise ConfigError(f"--{name}={shown(value)} is not allowed: use one of {', '.join(allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT


def _check_types(config: Config) -> None:
    """Every field holds its default's type (a float field also takes an int): a config read from
    JSON or built in Python fails here in one line, not with a TypeError later."""
    for field in dataclasses.fields(Config):
        value, default = getattr(config, field.name), field.default
        if isinstance(default, bool):
            ok, need = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, need = _is_int(value), f"an integer of at most {MAX_INT}"
        elif isinstance(default, float):
            ok, need = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            if ok and isinstance(value, int) and abs(value) > 2**53:
                ok, need = False, "a number of at most 2**53 (as an integer)"
        elif isinstance(default, tuple):
            ok = isinstance(value, tuple) and all(_is_int(v) for v in value)
            need = f"a list of integers, each of at most {MAX_INT}"
        else:
            ok, need = isinstance(value, str) and "\0" not in value, "a string (without NUL characters)"
        if not ok:
            raise ConfigError(f"--{field.name}={shown(value)} is not allowed: it must be {need}")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):   # NaN and inf: a rate must be a finite number
        need = ("zero or positive" if allow_zero else "positive") + (" and finite" if isinstance(value, float) else "")
        raise ConfigError(f"--{name}={value!r} is not allowed: it must be {need}")


def validate(config: Config) -> Config:
    """Check every value; return the config unchanged or raise ConfigError (one line).

    The model family's own checks (its fields, the shape walk) are its `validate`, run last."""
    _check_types(config)
    _choice("dataset", config.dataset, DATASETS)
    _choice("model", config.model, models.names())
    _choice("pool", config.pool, tuple(("max", "avg")))
    _choice("conv_padding", config.conv_padding, PADDINGS)
    _choice("init", config.init, INITS)
    _choice("optimizer", config.optimizer, OPTIMIZERS)
    _choice("schedule", config.schedule, SCHEDULES)
    _choice("loss_reduction", config.loss_reduction, LOSS_REDUCTIONS)
    _choice("conv_impl", config.conv_impl, CONV_IMPLS)
    _choice("loop", config.loop, LOOPS)
    _choice("pool_impl", config.pool_impl, POOL_IMPLS)
    _choice("layout", config.layout, LAYOUTS)
    _choice("ynnpack", config.ynnpack, YNNPACK)
    if config.pool_impl == "reshape" and config.pool_window != config.pool_stride:
        raise ConfigError(f"--pool_impl=reshape needs --pool_window == --pool_stride (got "
                          f"{config.pool_window} and {config.pool_stride}); use --pool_impl=reduce_window")
    if config.conv_impl == "winograd" and (config.layout == "NHWC" or config.pool_impl == "reduce_window"
                                           or config.pool_window != config.pool_stride):
        raise ConfigError("--conv_impl=winograd runs in the fused channel-major block: it needs "
                          "--layout=CHWN (or auto) and reshape pooling (--pool_window == --pool_stride, "
                          "--pool_impl=reshape or auto); use --conv_impl=patches otherwise")
    if config.conv_impl == "onednn" and config.layout == "CHWN":
        raise ConfigError("--conv_impl=onednn runs on NHWC activations: use --layout=auto or NHWC")
    if config.coordinator_address and ":" not in config.coordinator_address:
        raise ConfigError(f"--coordinator_address={shown(config.coordinator_address)} is not allowed: "
                          "give host:port of process 0")
    if isinstance(config.num_processes, bool) or not isinstance(config.num_processes, int) \
            or config.num_processes < 1:
        raise ConfigError(f"--num_processes={config.num_processes!r} is not allowed: it must be a positive integer")
    if not 0 <= config.process_id < config.num_processes:
        raise ConfigError(f"--process_id={config.process_id!r} is not allowed: it must be in "
                          f"0..{config.num_processes - 1} (--num_processes={config.num_processes})")
    _choice("train_eval", config.train_eval, TRAIN_EVALS)
    for name in ("conv_stride", "pool_window", "pool_stride", "num_fc", "num_classes",
                 "batch_size", "epochs", "eval_batch_size", "log_every"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"--{name}={value!r} is not allowed: it must be a positive integer")
        _positive(name, value)
    for name in ("train_subset", "test_subset", "seed", "augment_shift"):
        _positive(name, getattr(config, name), allow_zero=True)
    for name in ("learning_rate", "weight_scale"):
        _positive(name, getattr(config, name))
    for name in ("momentum", "weight_decay"):
        _positive(name, getattr(config, name), allow_zero=True)
    if not 0 <= config.ema_decay < 1:
        raise ConfigError(f"--ema_decay={shown(config.ema_decay)} is not allowed: it must be in [0, 1) "
                          "(0: off; e.g. 0.999)")
    if not 0 < config.loss_smoothing <= 1:
        raise ConfigError(f"--loss_smoothing={shown(config.loss_smoothing)} is not allowed: it must be in (0, 1]")
    if len(config.input_shape) != 3 or any(v <= 0 for v in config.input_shape):
        raise ConfigError(f"--input_shape={config.input_shape} is not allowed: give H,W,C, all positive")
    if config.augment_shift >= min(config.input_shape[:2]):
        raise ConfigError(f"--augment_shift={config.augment_shift} is not allowed: a shift must be smaller "
                          f"than the {config.input_shape[0]}x{config.input_shape[1]} images (a few pixels, e.g. 2)")
    models.family(config.model).validate(config)
    return config
