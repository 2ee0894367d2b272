"""absl flags for the experiment scripts: one flag per `Config` field, plus `--preset`.

A flag given on the command line overrides the preset's value; a flag left out
keeps it. `main_guard` turns the errors meant for users (bad config, bad data,
divergence) into one line on stderr and a non-zero exit, with no traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys
from typing import Any, Callable

from absl import flags

from cnn_jax import compile_cache
from cnn_jax import config as config_lib
from cnn_jax.config import Config, ConfigError

FLAGS = flags.FLAGS
_HELP = {
    "dataset": "Dataset: mnist, fashion_mnist, kmnist, cifar10 or cifar100 (input_shape and num_classes follow it).",
    "data_dir": "Folder with the dataset's official files (IDX, or CIFAR's batches or the folder above them); "
                "empty: the first source found (docs/data.md).",
    "conv_filters": "Filters per conv layer, comma-separated (one entry per conv layer).",
    "conv_kernels": "Kernel size per conv layer, comma-separated.",
    "pool": "Pooling: max or avg.",
    "num_fc": "Width of the hidden dense layer.",
    "init": "Initialisation: he, lecun (fan-in scaled) or seed (N(0, weight_scale)).",
    "optimizer": "seed_sgd (the tutorial's hand-written SGD), sgd, momentum, adam or adamw.",
    "schedule": "Learning-rate schedule for optax optimisers: constant, cosine, onecycle, warmup_cosine.",
    "loss_reduction": "How per-example losses combine over a batch: mean or sum (the seed).",
    "conv_impl": "Convolution lowering: auto (winograd on CPU, lax elsewhere), lax (reference), patches "
                 "(im2col + matmul) or winograd (F(4x4,5x5)/F(2x2,3x3) where it applies, else patches).",
    "loop": "Execution: auto, step (one jitted call per batch) or scan (a whole epoch in lax.scan).",
    "pool_impl": "Pooling lowering: auto, reduce_window (reference) or reshape (window == stride; tested equal).",
    "layout": "Activation layout: auto (CHWN on CPU, NHWC elsewhere), NHWC (reference) or CHWN.",
    "ynnpack": "XLA:CPU's YNNPACK fusions: auto (off on CPU, measured slower here), on or off.",
    "coordinator_address": "Multi-host: host:port of process 0 (jax.distributed); empty: this process alone.",
    "num_processes": "Multi-host: how many processes take part.",
    "process_id": "Multi-host: this process's index, 0 .. num_processes - 1.",
    "train_eval": "Train accuracy: full (evaluate the train set after each epoch) or running.",
    "debug": "Print every layer's output shape.",
}


def define_config_flags() -> None:
    """Define `--preset` and one flag per Config field (defaults: `Config()`'s values)."""
    flags.DEFINE_enum("preset", "default", sorted(config_lib.PRESETS),
                      "Named config to start from; flags given override its values.")
    for field in dataclasses.fields(Config):
        default = getattr(Config(), field.name)
        help_text = _HELP.get(field.name, field.name.replace("_", " ").capitalize() + ".")
        if isinstance(default, bool):
            flags.DEFINE_boolean(field.name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text)
        elif isinstance(default, tuple):
            flags.DEFINE_list(field.name, [str(v) for v in default], help_text)
        else:
            flags.DEFINE_string(field.name, default, help_text)
    flags.DEFINE_boolean("compilation_cache", True, "Keep compiled programs on disk (JAX's persistent "
                         "compilation cache), so a second run of the same config compiles almost nothing.")
    flags.DEFINE_string("compilation_cache_dir", "", "Folder of the compilation cache; empty: "
                        "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/cnn_jax/jax or ~/.cache/cnn_jax/jax.")


def _parse_int_list(name: str, values: list[str]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ConfigError(f"--{name}={','.join(values)} is not allowed: give comma-separated "
                          "integers, e.g. 20,50") from None


def config_from_flags(overrides: dict[str, Any] | None = None) -> Config:
    """The preset named by `--preset`, with every flag given on the command line applied; validated."""
    values = {}
    for field in dataclasses.fields(Config):
        if FLAGS[field.name].present:
            value = FLAGS[field.name].value
            if isinstance(getattr(Config(), field.name), tuple):
                value = _parse_int_list(field.name, value)
            values[field.name] = value
    values.update(overrides or {})
    return config_lib.validate(config_lib.replace(config_lib.PRESETS[FLAGS.preset], **values))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser, but an unparsable flag is one line on stderr and exit status 2.

    Pass it to `app.run(main, flags_parser=cli.parse_flags)`.
    """
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}; run with --helpshort to list the flags", file=sys.stderr)
        sys.exit(2)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user as it is."""
    from cnn_jax.data import DataError
    return (ConfigError, DataError, FloatingPointError)


# Exit status when stdout is closed early (`... | head`): the shell's 128 + SIGPIPE.
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE


def main_guard(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """Wrap an absl main: user errors become one line on stderr and exit status 2; SIGINT one
    line and 130; a reader that closes stdout early (`| head`) ends the script quietly with 141.

    In a script that defines the config flags, the persistent compilation cache is turned on
    first (unless --nocompilation_cache) and a last line says whether it was hit."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> Any:
        if len(argv) > 1:
            print(f"error: unexpected arguments {' '.join(argv[1:])}; flags look like --name=value",
                  file=sys.stderr)
            sys.exit(2)
        cache = None
        if "compilation_cache" in FLAGS and FLAGS.compilation_cache:
            cache = compile_cache.enable(FLAGS.compilation_cache_dir or None)
        try:
            result = main(argv)
            if cache is not None:
                print(cache.describe(), flush=True)
            sys.stdout.flush()   # here, not at exit, so a closed pipe is caught below
            return result
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            # SIGINT outside a training loop that checkpoints on it (data loading, compiling, a sweep):
            # every file is written atomically, so what is on disk is complete.
            print("error: interrupted by SIGINT; the files already written are complete "
                  "(a sweep continues where it stopped when run again)", file=sys.stderr)
            sys.exit(128 + signal.SIGINT)
        except BrokenPipeError:
            # Python's recipe: point stdout at /dev/null so the flush at exit fails no more.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(BROKEN_PIPE_EXIT)

    return wrapped
