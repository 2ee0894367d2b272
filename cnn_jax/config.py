"""The one experiment config: every knob, its defaults, the named presets, validation.

`Config` is a frozen dataclass; a preset is just another value of it
(`PRESETS["tutorial"]` is the MXNet tutorial's recipe). Each field is described once, where it
is declared (`field`): its default, its type, its flag's help text, the group `--helpshort` lists
it under and its roles (`ROLES`); `FLAG_GROUPS` and the role sets other modules keep
(`fields_with_role`) are derived from that. `validate` checks what every model family shares and
raises `ConfigError` with a one-line message naming the flag, the value and what is allowed; a
family checks its own fields (`cnn_jax.model.validate` runs both). Names that were renamed
(`RENAMED_PRESETS`, `RENAMED_VALUES`) are errors naming the new one when given, and are
migrated when read from a run's config.json (`from_dict`). This module imports nothing of
cnn_jax but the dataset registry, a leaf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from cnn_jax.data import registry as datasets

DATASETS = datasets.NAMES
POOLS = ("max", "avg")
PADDINGS = ("VALID", "SAME")
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
SGD_WEIGHT_DECAYS = ("off", "l2", "decoupled")
ERASING_FILLS = ("random", "zero")
COMPUTE_DTYPES = ("float32", "bfloat16")

# The headings the experiment scripts' `--helpshort` lists the config flags under (cnn_jax.cli), in order.
GROUPS = ("data", "model", "optimisation", "execution", "run")
# The scripts' flags that are not fields (cnn_jax.cli defines them), listed before / after a group's fields.
FLAGS_BEFORE: dict[str, tuple[str, ...]] = {"run": ("preset",)}
FLAGS_AFTER: dict[str, tuple[str, ...]] = {"execution": ("compilation_cache", "compilation_cache_dir")}
ROLES: dict[str, str] = {
    "per_run": "may differ between the runs of one vmapped sweep group (cnn_jax.sweep): an optimiser "
               "hyperparameter, the init scale, the seed (each run's initial state and data order) or a "
               "host-side reporting knob",
    "data": "selects the data: runs that share every such field share one loaded dataset (cnn_jax.sweep)",
    "resumable": "a resumed run may change it (cnn_jax.rundir.workdir): it alters where data comes from or how "
                 "the run reports and executes, not what it computes (epochs extends or shortens the run); "
                 "another lowering or device count computes the same maths up to float rounding, so a resumed "
                 "run stays bit-identical to an uninterrupted one only if these are kept",
    "hyperparam": "an optimiser hyperparameter, an array in the optimiser state (cnn_jax.engine.optim), "
                  "not a constant of the compiled step",
}


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


def one_of(choices: tuple[str, ...], notes: Mapping[str, str] | None = None) -> str:
    """`a, b (note) or c`: the choices for help text, in order, each with its note if any."""
    notes = notes or {}
    unknown = set(notes) - set(choices)
    if unknown:
        raise ValueError(f"notes for {sorted(unknown)}, not among the choices {choices}")
    items = [f"{c} ({notes[c]})" if c in notes else c for c in choices]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def field(default: Any, *, help: str, group: str, roles: tuple[str, ...] = (),
          choices: tuple[str, ...] | None = None) -> Any:
    """A Config field described once: its default, its flag's help text, its `--helpshort` group,
    its roles (`ROLES`) and, for a field of named values, the allowed ones."""
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"roles {sorted(unknown)} are not among {tuple(ROLES)}")
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "roles": tuple(roles),
                                                        "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of an experiment; `experiments/train.py` has one flag per field."""

    # Data.
    dataset: str = field(
        "mnist", group="data", roles=("data",), choices=DATASETS,
        help=f"Dataset: {one_of(DATASETS)} (input_shape and num_classes follow it).")
    data_dir: str = field(
        "", group="data", roles=("data", "resumable"),
        help="Folder with the dataset's official files (IDX, or CIFAR's batches or the folder above them); "
             "empty: the first source found (docs/data.md).")
    train_subset: int = field(0, group="data", roles=("data",),
                              help="Train on the first N training images only (0: all).")
    test_subset: int = field(0, group="data", roles=("data",),
                             help="Evaluate on the first N test images only (0: all).")
    augment_shift: int = field(
        0, group="data",
        help="Training augmentation: shift each image by up to N pixels (pad with zeros, crop); 0: off.")
    augment_flip: bool = field(
        False, group="data", help="Training augmentation: mirror images left-right at random (keep off for digits).")
    random_erasing: float = field(
        0.0, group="data",
        help="Training augmentation: erase a random rectangle of each image with this probability "
             "(random erasing, Zhong et al. 2017; cutout with --random_erasing_fill=zero); 0: off.")
    random_erasing_min_area: float = field(
        0.02, group="data", help="Random erasing: the smallest erased area, as a fraction of the image.")
    random_erasing_max_area: float = field(
        1 / 3, group="data", help="Random erasing: the largest erased area, as a fraction of the image.")
    random_erasing_fill: str = field(
        "random", group="data", choices=ERASING_FILLS,
        help="Random erasing fills the rectangle with " + one_of(ERASING_FILLS, {
            "random": "uniform noise per pixel, Zhong et al.", "zero": "cutout"}) + ".")
    mixup_alpha: float = field(
        0.0, group="data",
        help="Training augmentation: mixup (Zhang et al. 2018): each batch blended with a permutation of "
             "itself, weight ~ Beta(alpha, alpha), the loss the weighted pair of cross-entropies; 0: off.")
    cutmix_alpha: float = field(
        0.0, group="data",
        help="Training augmentation: cutmix (Yun et al. 2019): a box of a permuted batch pasted in, its "
             "area ~ Beta(alpha, alpha); with --mixup_alpha too, each batch takes one of the two; 0: off.")
    # Model: the family (cnn_jax.models), then the fields of the tutorial's CNN.
    model: str = field(
        "cnn", group="model",
        help="Model family (cnn_jax.models): {names}. Families of your own: $CNN_JAX_MODELS=name=module,...")
    conv_filters: tuple[int, ...] = field(
        (20, 50), group="model", help="Filters per conv layer, comma-separated (one entry per conv layer).")
    conv_kernels: tuple[int, ...] = field((3, 5), group="model", help="Kernel size per conv layer, comma-separated.")
    conv_stride: int = field(1, group="model", help="Stride of every conv layer.")
    conv_padding: str = field("VALID", group="model", choices=PADDINGS,
                              help=f"Padding of every conv layer: {one_of(PADDINGS)}.")
    pool: str = field("max", group="model", choices=POOLS, help=f"Pooling: {one_of(POOLS)}.")
    pool_window: int = field(2, group="model", help="Pooling window (its height and width).")
    pool_stride: int = field(2, group="model", help="Pooling stride.")
    num_fc: int = field(128, group="model", help="Width of the hidden dense layer.")
    num_classes: int = field(10, group="model", roles=("data",),
                             help="Classes of the output layer (follows --dataset unless given).")
    input_shape: tuple[int, int, int] = field((28, 28, 1), group="model", roles=("data",),
                                              help="Image shape H,W,C (follows --dataset unless given).")
    init: str = field(
        "he", group="model", choices=INITS,
        help="Initialisation: " + one_of(INITS, {"lecun": "fan-in scaled",
                                                 "normal": "every weight and bias ~ N(0, weight_scale)"}) + ".")
    weight_scale: float = field(0.01, group="model", roles=("per_run",), help="Standard deviation of --init=normal.")
    # Fields of the batch-normalised families (vgg, resnet).
    widths: tuple[int, ...] = field(
        (32, 64, 128), group="model", help="vgg, resnet: channels of each VGG block / ResNet stage, comma-separated.")
    depth: int = field(
        2, group="model",
        help="vgg, resnet: conv layers per VGG block / pre-activation residual blocks per ResNet stage.")
    dropout: float = field(
        0.0, group="model", help="vgg, resnet: dropout rate before the classifier (0: none; training only).")
    bn_momentum: float = field(
        0.9, group="model",
        help="vgg, resnet: batch norm running averages move as momentum * running + (1 - momentum) * batch.")
    drop_path: float = field(
        0.0, group="model",
        help="resnet: stochastic depth, the largest rate at which a block's residual branch is dropped per "
             "example in training (rising linearly to it over the blocks; scaled to keep the expectation); 0: off.")
    # Optimisation.
    optimizer: str = field(
        "adam", group="optimisation", choices=OPTIMIZERS,
        help=one_of(OPTIMIZERS, {"sgd": "at a constant rate with --loss_reduction=sum: the tutorial's"}) + ".")
    learning_rate: float = field(1e-3, group="optimisation", roles=("per_run", "hyperparam"),
                                 help="Learning rate (the peak of --schedule).")
    schedule: str = field("constant", group="optimisation", choices=SCHEDULES,
                          help=f"Learning-rate schedule: {one_of(SCHEDULES)}.")
    warmup_steps: int = field(
        0, group="optimisation",
        help="Linear warm-up from 0 over the first N steps, then --schedule over the rest "
             "(warmup_cosine keeps its own); 0: none.")
    momentum: float = field(0.9, group="optimisation", roles=("per_run", "hyperparam"),
                            help="Momentum of --optimizer=momentum.")
    weight_decay: float = field(
        1e-4, group="optimisation", roles=("per_run", "hyperparam"),
        help="Weight decay of --optimizer=adamw (and of sgd / momentum with --sgd_weight_decay).")
    sgd_weight_decay: str = field(
        "off", group="optimisation", choices=SGD_WEIGHT_DECAYS,
        help="How --weight_decay applies to --optimizer=sgd and momentum: " + one_of(SGD_WEIGHT_DECAYS, {
            "l2": "added to the gradient before momentum, as torch.optim.SGD",
            "decoupled": "added to the update after momentum, SGDW"}) + ".")
    grad_clip_norm: float = field(
        0.0, group="optimisation",
        help="Clip the gradient to this global norm before the optimiser (optax.clip_by_global_norm); 0: off.")
    ema_decay: float = field(
        0.0, group="optimisation",
        help="Evaluate (and checkpoint) an exponential moving average of the params with this decay, "
             "e.g. 0.999; 0: off.")
    label_smoothing: float = field(
        0.0, group="optimisation",
        help="Label smoothing of the training loss: (1 - e) * cross-entropy + e * the mean over classes of "
             "-log p (evaluation keeps the plain cross-entropy); 0: off.")
    loss_reduction: str = field(
        "mean", group="optimisation", choices=LOSS_REDUCTIONS,
        help=f"How per-example losses combine over a batch: {one_of(LOSS_REDUCTIONS, {'sum': 'the tutorial'})}.")
    batch_size: int = field(64, group="optimisation", help="Training images per step.")
    epochs: int = field(1, group="optimisation", roles=("resumable",), help="Passes over the training set.")
    seed: int = field(
        0, group="optimisation", roles=("per_run",),
        help="Random seed: the initial params, the data order and each step's randomness (dropout, augmentation).")
    # Execution.
    conv_impl: str = field(
        "auto", group="execution", roles=("resumable",), choices=CONV_IMPLS,
        help="Convolution lowering: " + one_of(CONV_IMPLS, {
            "auto": "on CPU winograd in the tutorial CNN's fused conv-relu-pool blocks where it applies, else "
                    "patches, and onednn for the batch-norm families when it builds; lax elsewhere",
            "lax": "reference",
            "patches": "im2col + matmul",
            "winograd": "F(4x4,5x5)/F(2x2,3x3) where it applies, else patches; fused blocks only",
            "onednn": "oneDNN's convolutions, CPU, NHWC"}) + ".")
    loop: str = field(
        "auto", group="execution", roles=("resumable",), choices=LOOPS,
        help="Execution: " + one_of(LOOPS, {"step": "one jitted call per batch",
                                            "scan": "a whole epoch in lax.scan"}) + ".")
    pool_impl: str = field(
        "auto", group="execution", roles=("resumable",), choices=POOL_IMPLS,
        help="Pooling lowering: " + one_of(POOL_IMPLS, {
            "reduce_window": "reference",
            "reshape": "window == stride; tested equal",
            "onednn": "the batch-norm families' 2x2 max pooling through oneDNN; their CPU auto with onednn convs"})
        + ".")
    layout: str = field(
        "auto", group="execution", roles=("resumable",), choices=LAYOUTS,
        help="Activation layout: " + one_of(LAYOUTS, {
            "auto": "CHWN on CPU where the tutorial CNN's fused blocks run, NHWC elsewhere",
            "NHWC": "reference", "CHWN": "channel-major, batch-minor"}) + ".")
    compute_dtype: str = field(
        "float32", group="execution", choices=COMPUTE_DTYPES,
        help="Dtype of the convolutions' and matmuls' inputs (accumulation, params, optimiser state, batch-norm "
             "statistics, loss and softmax stay float32): " + one_of(COMPUTE_DTYPES, {
                 "bfloat16": "needs a GPU or a CPU with AVX512_BF16 or AMX-BF16"}) + ".")
    ynnpack: str = field(
        "auto", group="execution", choices=YNNPACK,
        help="XLA:CPU's YNNPACK fusions: "
             + one_of(YNNPACK, {"auto": "off on CPU, where they run slower for these networks"}) + ".")
    # Multi-host data parallelism (jax.distributed).
    coordinator_address: str = field(
        "", group="execution", roles=("resumable",),
        help="Multi-host: host:port of process 0 (jax.distributed); empty: this process alone.")
    num_processes: int = field(1, group="execution", roles=("resumable",),
                               help="Multi-host: how many processes take part.")
    process_id: int = field(0, group="execution", roles=("resumable",),
                            help="Multi-host: this process's index, 0 .. num_processes - 1.")
    eval_batch_size: int = field(1000, group="execution", roles=("resumable",),
                                 help="Images per evaluation batch (forward pass only).")
    # Reporting.
    train_eval: str = field(
        "full", group="run", roles=("resumable",), choices=TRAIN_EVALS,
        help="Train accuracy: " + one_of(TRAIN_EVALS, {"full": "evaluate the train set after each epoch",
                                                       "running": "accumulated during the epoch"}) + ".")
    tta_flip: bool = field(
        False, group="run",
        help="Evaluate with test-time augmentation: the mean of the logits of each image and its left-right "
             "mirror (keep off for digits).")
    loss_smoothing: float = field(
        0.01, group="run", roles=("per_run",),
        help="Rate s of the moving-average training loss the epoch line prints: m <- (1 - s) * m + s * loss.")
    log_every: int = field(100, group="run", roles=("per_run", "resumable"),
                           help="Steps between logged training losses.")
    debug: bool = field(False, group="run", roles=("resumable",), help="Print every layer's output shape.")


def fields_with_role(role: str) -> tuple[str, ...]:
    """The names of the fields that have `role` (`ROLES`), in declaration order."""
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {tuple(ROLES)}")
    return tuple(f.name for f in dataclasses.fields(Config) if role in f.metadata["roles"])


def _flag_groups() -> dict[str, tuple[str, ...]]:
    """Each group's flags: the non-field flags before, its fields in declaration order, those after."""
    fields = dataclasses.fields(Config)
    return {group: FLAGS_BEFORE.get(group, ()) + tuple(f.name for f in fields if f.metadata["group"] == group)
            + FLAGS_AFTER.get(group, ()) for group in GROUPS}


# Every Config field, `--preset` and the compilation cache's flags, each in one group (cnn_jax.cli).
FLAG_GROUPS: dict[str, tuple[str, ...]] = _flag_groups()


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
# MNIST's best single model in at most 15 minutes a run on the 2-core CPU: vgg's recipe in bfloat16
# products (a CPU with bfloat16 instructions, or an accelerator), 14 epochs and label smoothing 0.1;
# chosen on a validation split against no smoothing and against an EMA of the weights (docs/mnist.md).
PRESETS["vgg_long"] = dataclasses.replace(PRESETS["vgg"], epochs=14, label_smoothing=0.1, compute_dtype="bfloat16")
# Fashion-MNIST's recipe: vgg's, with left-right flips (clothes, unlike digits, keep their class when
# mirrored) instead of shifts: chosen on a validation split against shifts of 1 and 2 pixels with
# flips (docs/recipes.md).
PRESETS["vgg_fashion"] = dataclasses.replace(PRESETS["vgg"], dataset="fashion_mnist", augment_shift=0,
                                             augment_flip=True)
# Fashion-MNIST's best in at most 30 minutes a run on the 2-core CPU: vgg_fashion's network, flips
# and schedule in bfloat16 products, 30 epochs, regularised against the overfitting longer training
# brings (random erasing 0.5, label smoothing 0.1), with flip-averaged evaluation; chosen on a
# validation split (docs/fashion_long.md).
PRESETS["vgg_fashion_long"] = dataclasses.replace(PRESETS["vgg_fashion"], epochs=30, random_erasing=0.5,
                                                  label_smoothing=0.1, compute_dtype="bfloat16", tta_flip=True)
# Fashion-MNIST in at most 3 minutes a run on the 2-core CPU: vgg_fashion's flips and schedule on a
# narrower network (widths 24, 48, 96) with bfloat16 products (a CPU with bfloat16 instructions, or
# an accelerator), 5 epochs at a one-cycle peak of 0.01, no dropout, flip-averaged evaluation;
# chosen on a validation split (docs/fashion.md).
PRESETS["fast_fashion"] = dataclasses.replace(PRESETS["vgg_fashion"], widths=(24, 48, 96), epochs=5, dropout=0.0,
                                              learning_rate=0.01, compute_dtype="bfloat16", tta_flip=True)

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


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """ConfigError (one line) unless `value` of flag `name` is one of `allowed`; a renamed value names the new one."""
    check_renamed(name, value)
    if value not in allowed:
        raise ConfigError(f"--{name}={shown(value)} is not allowed: use one of {', '.join(allowed)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT


def _check_types(config: Config) -> None:
    """Every field holds its default's type (a float field also takes an int): a config read from
    JSON or built in Python fails here in one line, not with a TypeError later."""
    for f in dataclasses.fields(Config):
        value, default = getattr(config, f.name), f.default
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
            raise ConfigError(f"--{f.name}={shown(value)} is not allowed: it must be {need}")


def check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    """ConfigError (one line) unless `value` of flag `name` is positive (or zero) and finite."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):   # NaN and inf: a rate must be a finite number
        need = ("zero or positive" if allow_zero else "positive") + (" and finite" if isinstance(value, float) else "")
        raise ConfigError(f"--{name}={value!r} is not allowed: it must be {need}")


def check_positive_int(name: str, value: Any) -> None:
    """ConfigError (one line) unless `value` of flag `name` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"--{name}={value!r} is not allowed: it must be a positive integer")
    check_positive(name, value)


# Fields whose choices every family shares (a family checks its own, e.g. the tutorial CNN's pool).
SHARED_CHOICES = ("dataset", "init", "optimizer", "schedule", "loss_reduction", "conv_impl", "loop", "pool_impl",
                  "layout", "ynnpack", "compute_dtype", "sgd_weight_decay", "random_erasing_fill")


def validate(config: Config) -> Config:
    """Check the values every model family shares; return the config unchanged or raise ConfigError
    (one line). The family's checks of its own fields are its `validate`: `cnn_jax.model.validate`
    runs both (and the `model` choice, which needs the family registry)."""
    _check_types(config)
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(Config)}
    for name in SHARED_CHOICES:
        check_choice(name, getattr(config, name), choices[name])
    _check_execution(config)
    check_choice("train_eval", config.train_eval, TRAIN_EVALS)
    for name in ("num_classes", "batch_size", "epochs", "eval_batch_size", "log_every"):
        check_positive_int(name, getattr(config, name))
    for name in ("train_subset", "test_subset", "seed", "augment_shift"):
        check_positive(name, getattr(config, name), allow_zero=True)
    for name in ("learning_rate", "weight_scale"):
        check_positive(name, getattr(config, name))
    for name in ("momentum", "weight_decay"):
        check_positive(name, getattr(config, name), allow_zero=True)
    _check_techniques(config)
    if not 0 < config.loss_smoothing <= 1:
        raise ConfigError(f"--loss_smoothing={shown(config.loss_smoothing)} is not allowed: it must be in (0, 1]")
    if len(config.input_shape) != 3 or any(v <= 0 for v in config.input_shape):
        raise ConfigError(f"--input_shape={config.input_shape} is not allowed: give H,W,C, all positive")
    if config.augment_shift >= min(config.input_shape[:2]):
        raise ConfigError(f"--augment_shift={config.augment_shift} is not allowed: a shift must be smaller "
                          f"than the {config.input_shape[0]}x{config.input_shape[1]} images (a few pixels, e.g. 2)")
    return config


def _check_execution(config: Config) -> None:
    """Lowerings that exclude each other, and the multi-host fields."""
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


def _check_techniques(config: Config) -> None:
    """The training techniques' fields (all off at their defaults)."""
    if config.sgd_weight_decay != "off" and config.optimizer not in ("sgd", "momentum"):
        raise ConfigError(f"--sgd_weight_decay={config.sgd_weight_decay} applies to --optimizer=sgd or momentum, "
                          f"not {config.optimizer}: use --sgd_weight_decay=off (adamw decays with --weight_decay)")
    check_positive("grad_clip_norm", config.grad_clip_norm, allow_zero=True)
    check_positive("warmup_steps", config.warmup_steps, allow_zero=True)
    if config.warmup_steps and config.schedule == "warmup_cosine":
        raise ConfigError(f"--warmup_steps={config.warmup_steps} is not allowed with --schedule=warmup_cosine, "
                          "which warms up over its first tenth: use --schedule=cosine --warmup_steps=N")
    for name in ("label_smoothing", "random_erasing", "random_erasing_min_area", "random_erasing_max_area"):
        value = getattr(config, name)
        if not 0 <= value <= 1:
            raise ConfigError(f"--{name}={shown(value)} is not allowed: it must be in [0, 1] (0: off)")
    if not 0 < config.random_erasing_min_area <= config.random_erasing_max_area:
        raise ConfigError(f"--random_erasing_min_area={config.random_erasing_min_area!r} is not allowed: it must be "
                          f"positive and at most --random_erasing_max_area={config.random_erasing_max_area!r}")
    for name in ("mixup_alpha", "cutmix_alpha"):
        check_positive(name, getattr(config, name), allow_zero=True)
    if not 0 <= config.drop_path < 1:
        raise ConfigError(f"--drop_path={shown(config.drop_path)} is not allowed: it must be in [0, 1) (0: off)")
    if not 0 <= config.ema_decay < 1:
        raise ConfigError(f"--ema_decay={shown(config.ema_decay)} is not allowed: it must be in [0, 1) "
                          "(0: off; e.g. 0.999)")
