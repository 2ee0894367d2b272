"""The one experiment config: every knob, its defaults, the named presets, validation.

`Config` is a frozen dataclass; a preset is just another value of it
(`PRESETS["seed"]` is the MXNet tutorial's recipe). `validate` is the single
place where values are checked; it raises `ConfigError` with a one-line message
naming the flag, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from cnn_jax import datasets
from cnn_jax.layers import PADDINGS, conv_output_size

DATASETS = datasets.NAMES
INITS = ("he", "lecun", "seed")
OPTIMIZERS = ("seed_sgd", "sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "onecycle", "warmup_cosine")
LOSS_REDUCTIONS = ("mean", "sum")
CONV_IMPLS = ("auto", "lax", "patches", "winograd")
POOL_IMPLS = ("auto", "reduce_window", "reshape")
LAYOUTS = ("auto", "NHWC", "CHWN")
YNNPACK = ("auto", "on", "off")
LOOPS = ("auto", "step", "scan")
TRAIN_EVALS = ("full", "running")


class ConfigError(ValueError):
    """A config value is invalid; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of an experiment; `experiments/train.py` has one flag per field."""

    # Data.
    dataset: str = "mnist"            # mnist | fashion_mnist | kmnist | cifar10 | cifar100 (cnn_jax.datasets)
    data_dir: str = ""                # folder with the dataset's offline files; empty: searched (cnn_jax.data)
    train_subset: int = 0             # train on the first N images only (0: all)
    test_subset: int = 0              # evaluate on the first N test images only (0: all)
    # Model.
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
    init: str = "he"                  # he | lecun | seed (every weight and bias ~ N(0, weight_scale))
    weight_scale: float = 0.01        # std of the seed init
    # Optimisation.
    optimizer: str = "adam"           # seed_sgd | sgd | momentum | adam | adamw
    learning_rate: float = 1e-3
    schedule: str = "constant"        # constant | cosine | onecycle | warmup_cosine (optax optimisers)
    momentum: float = 0.9
    weight_decay: float = 1e-4        # adamw only
    loss_reduction: str = "mean"      # mean | sum (the seed sums the per-example loss over the batch)
    batch_size: int = 64
    epochs: int = 1
    seed: int = 0
    # Execution and reporting.
    conv_impl: str = "auto"           # auto | lax | patches | winograd (auto: winograd on CPU, lax elsewhere)
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
    loss_smoothing: float = 0.01      # the seed's moving-average loss
    log_every: int = 100              # steps between logged training losses
    debug: bool = False               # print every layer's output shape


PRESETS: dict[str, Config] = {
    "default": Config(),
    # The MXNet tutorial exactly: N(0, 0.01) init, hand-written SGD at lr 0.01 on the
    # summed loss, average pooling, batch 64, one epoch.
    "seed": Config(pool="avg", init="seed", weight_scale=0.01, optimizer="seed_sgd",
                   learning_rate=0.01, loss_reduction="sum"),
    # >= 0.99 test accuracy in the least wall time (WORKSPACE.md, Performance): the seed
    # network with max pooling, He init, Adam with a one-cycle schedule, one epoch at batch
    # 64, the training accuracy taken during the epoch instead of in an extra pass, and
    # evaluation in batches of 250 (XLA:CPU's forward pass is fastest there).
    "fast": Config(pool="max", init="he", optimizer="adam", learning_rate=0.006, schedule="onecycle",
                   batch_size=64, epochs=1, train_eval="running", eval_batch_size=250),
}


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config))


def replace(config: Config, **overrides: Any) -> Config:
    """`dataclasses.replace` that names an unknown field in a ConfigError.

    A new `dataset` brings its image shape and class count from the registry, unless
    `input_shape` or `num_classes` are given too."""
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(field_names())}")
    name = overrides.get("dataset", config.dataset)
    if name != config.dataset and name in datasets.REGISTRY:
        spec = datasets.get(name)
        overrides = {"input_shape": spec.image_shape, "num_classes": spec.num_classes, **overrides}
    return dataclasses.replace(config, **overrides)


def to_dict(config: Config) -> dict[str, Any]:
    """JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def from_dict(values: dict[str, Any]) -> Config:
    """Inverse of `to_dict`; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(unknown)}")
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name}={value!r} is not allowed: use one of {', '.join(allowed)}")


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):   # NaN and inf: a rate must be a finite number
        need = ("zero or positive" if allow_zero else "positive") + (" and finite" if isinstance(value, float) else "")
        raise ConfigError(f"--{name}={value!r} is not allowed: it must be {need}")


def validate(config: Config) -> Config:
    """Check every value; return the config unchanged or raise ConfigError (one line)."""
    _choice("dataset", config.dataset, DATASETS)
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
    if config.coordinator_address and ":" not in config.coordinator_address:
        raise ConfigError(f"--coordinator_address={config.coordinator_address!r} is not allowed: "
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
    for name in ("train_subset", "test_subset", "seed"):
        _positive(name, getattr(config, name), allow_zero=True)
    for name in ("learning_rate", "weight_scale"):
        _positive(name, getattr(config, name))
    for name in ("momentum", "weight_decay"):
        _positive(name, getattr(config, name), allow_zero=True)
    if not 0 < config.loss_smoothing <= 1:
        raise ConfigError(f"--loss_smoothing={config.loss_smoothing!r} is not allowed: it must be in (0, 1]")
    if config.optimizer == "seed_sgd" and config.schedule != "constant":
        raise ConfigError(f"--schedule={config.schedule!r} is not allowed with --optimizer=seed_sgd "
                          "(the tutorial's SGD has a constant rate): use --schedule=constant "
                          "or an optax optimiser")
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
    if len(config.input_shape) != 3 or any(v <= 0 for v in config.input_shape):
        raise ConfigError(f"--input_shape={config.input_shape} is not allowed: give H,W,C, all positive")
    # Walk the network: each conv kernel and pool window must fit its input.
    h, w, _ = config.input_shape
    for i, kernel in enumerate(config.conv_kernels, start=1):
        if config.conv_padding == "VALID" and kernel > min(h, w):
            raise ConfigError(
                f"--conv_kernels: conv{i} kernel {kernel} is larger than its {h}x{w} input; "
                "use smaller kernels, fewer conv layers or --conv_padding=SAME")
        h = conv_output_size(h, kernel, config.conv_stride, config.conv_padding)
        w = conv_output_size(w, kernel, config.conv_stride, config.conv_padding)
        if config.pool_window > min(h, w):
            raise ConfigError(
                f"--pool_window={config.pool_window}: pool{i} window is larger than its {h}x{w} input, "
                "so the flattened size would be zero; use smaller kernels or fewer conv layers")
        h = conv_output_size(h, config.pool_window, config.pool_stride)
        w = conv_output_size(w, config.pool_window, config.pool_stride)
    return config
