"""absl flags for the experiment scripts: one flag per `Config` field, plus `--preset`.

A flag given on the command line overrides the preset's value; a flag left out
keeps it. `--help` and `--helpshort` list the script's own flags, then the config flags
grouped as `config.FLAG_GROUPS` says (data, model, optimisation, execution, run);
`--helpfull` adds absl's own. `main_guard` turns the errors meant for users (bad config, bad data,
divergence, a file that cannot be written) into one line on stderr and a non-zero
exit, with no traceback; it also keeps the echoes of orbax's and tensorstore's
background threads off stderr (`quiet_background_reports`), a process-wide setting
that belongs to the scripts, not to the library.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import sys
from typing import Any, Callable

from absl import app, flags

from cnn_jax.engine import compile_cache
from cnn_jax import config as config_lib
from cnn_jax import models
from cnn_jax import model as model_lib
from cnn_jax.config import Config, ConfigError
from cnn_jax.rundir.workdir import WriteError

FLAGS = flags.FLAGS


class _PresetFlag(flags.EnumFlag):
    """`--preset`: one of `config.PRESETS`; a renamed preset is a one-line error naming the new one."""

    def parse(self, argument: Any) -> None:
        config_lib.check_renamed("preset", argument)
        super().parse(argument)


class _GroupedHelpFlag(app.HelpFlag):
    """absl's `--help` (and `--helpshort`), listing the config flags by group too (`short_help`)."""

    def __init__(self, name: str, short_name: str | None):
        self.NAME, self.SHORT_NAME = name, short_name
        super().__init__()

    def parse(self, arg: Any) -> None:
        if self._parse(arg):
            print((sys.modules["__main__"].__doc__ or "").rstrip() + "\n\nflags:\n" + short_help())
            print("\nTry --helpfull to get a list of all flags, absl's own included.")
            sys.exit(1)   # as absl's help flags do


def short_help() -> str:
    """The script's own flags, then the config flags under their groups' headings."""
    return "\n".join(text for text in [FLAGS.main_module_help()] +
                     [FLAGS.module_help(group) for group in config_lib.FLAG_GROUPS] if text)


def _use_grouped_help() -> None:
    """Replace absl's `--help`/`-?` and `--helpshort` by `_GroupedHelpFlag`s (once)."""
    app.define_help_flags()   # idempotent: app.run's own call then keeps these
    if isinstance(FLAGS["help"], _GroupedHelpFlag):
        return
    for name in ("help", "?", "helpshort"):
        delattr(FLAGS, name)
    flags.DEFINE_flag(_GroupedHelpFlag("help", "?"), module_name="absl.app")
    flags.DEFINE_flag(_GroupedHelpFlag("helpshort", None), module_name="absl.app")


def define_config_flags() -> None:
    """Define `--preset`, one flag per Config field (its default, help text and group as the field
    declares them: `config.field`) and the compilation cache's flags, each under its group of
    `config.FLAG_GROUPS` (the heading `--helpshort` lists it under)."""
    group_of = {name: group for group, names in config_lib.FLAG_GROUPS.items() for name in names}
    flags.DEFINE_flag(_PresetFlag("preset", "default", "Named config to start from; flags given override its "
                                  "values.", sorted(config_lib.PRESETS)), module_name=group_of["preset"])
    for field in dataclasses.fields(Config):
        default, help_text = field.default, field.metadata["help"]
        where = {"module_name": field.metadata["group"]}
        if field.name == "model":
            names = models.names()
            flags.DEFINE_enum(field.name, default, list(names), help_text.format(names=config_lib.one_of(names)),
                              **where)
        elif isinstance(default, bool):
            flags.DEFINE_boolean(field.name, default, help_text, **where)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text, **where)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text, **where)
        elif isinstance(default, tuple):
            flags.DEFINE_list(field.name, [str(v) for v in default], help_text, **where)
        else:
            flags.DEFINE_string(field.name, default, help_text, **where)
    flags.DEFINE_boolean("compilation_cache", True, "Keep compiled programs on disk (JAX's persistent "
                         "compilation cache), so a second run of the same config compiles almost nothing.",
                         module_name=group_of["compilation_cache"])
    flags.DEFINE_string("compilation_cache_dir", "", "Folder of the compilation cache; empty: "
                        "$JAX_COMPILATION_CACHE_DIR, else $XDG_CACHE_HOME/cnn_jax/jax or ~/.cache/cnn_jax/jax.",
                        module_name=group_of["compilation_cache_dir"])
    _use_grouped_help()


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
    return model_lib.validate(config_lib.replace(config_lib.preset(FLAGS.preset), **values))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser, but an unparsable flag is one line on stderr and exit status 2.

    Pass it to `app.run(main, flags_parser=cli.parse_flags)`.
    """
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}; run with --helpshort to list the flags", file=sys.stderr)
        sys.exit(2)
    except ConfigError as e:   # a renamed value (`--preset=seed`)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user as it is."""
    from cnn_jax.data.sources import DataError
    return (ConfigError, DataError, FloatingPointError)


# Exit status when stdout is closed early (`... | head`): the shell's 128 + SIGPIPE.
BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE


def is_closed_loop_report(error: BaseException | None) -> bool:
    """Whether `error` is an echo of a failed orbax read or write: `RuntimeError('Event loop is closed')`."""
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


class _DropThreadEchoes(logging.Filter):
    """Drops the ERROR records orbax's worker threads log for an exception they hand on to the
    thread that waits for them, which raises it again (and main_guard reports it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("orbax" in record.pathname and record.levelno >= logging.ERROR
                    and "raised an exception" in record.getMessage())


def quiet_background_reports() -> None:
    """Keep the echoes of orbax's and tensorstore's background threads off stderr.

    When a checkpoint read or write fails, orbax closes its event loop while tensorstore
    still finishes the other reads or writes, and each of those calls back into the closed
    loop. Python reports every such `RuntimeError('Event loop is closed')` as a traceback
    (at random moments, often at exit): through `sys.unraisablehook`, or, when tensorstore's
    callback thread prints the error itself, through `sys.excepthook`. Orbax's worker threads
    also log the error that the waiting thread raises. Only those reports are dropped; every
    other one reaches the previous hook. Process-wide: scripts call it (`main_guard` does).
    """
    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
    if not getattr(previous_unraisable, "drops_closed_loop_reports", False):
        def unraisable_hook(unraisable: Any) -> None:
            if not is_closed_loop_report(unraisable.exc_value):
                previous_unraisable(unraisable)

        def except_hook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
            if not is_closed_loop_report(error):
                previous_except(kind, error, tb)

        unraisable_hook.drops_closed_loop_reports = True
        sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropThreadEchoes) for f in absl_logger.filters):
        absl_logger.addFilter(_DropThreadEchoes())


def end_now(status: int) -> None:
    """Flush stdout and stderr and end the process at once with `status`.

    After a failed write, orbax's and tensorstore's threads may still be finishing (and
    failing) the other parts of it; ending at once, rather than through the interpreter's
    shutdown, keeps their reports (and those of their abandoned coroutines) off stderr.
    Every file of a run is complete or absent at any moment, so nothing is lost.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def main_guard(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """Wrap an absl main: user errors become one line on stderr and exit status 2; a file that
    cannot be written (disk full, read-only, folder gone) one line and 2; SIGINT one line and
    130; a reader that closes stdout early (`| head`) ends the script quietly with 141.

    In a script that defines the config flags, the persistent compilation cache is turned on
    first (unless --nocompilation_cache) and a last line says whether it was hit."""

    @functools.wraps(main)
    def wrapped(argv: list[str]) -> Any:
        if len(argv) > 1:
            print(f"error: unexpected arguments {' '.join(argv[1:])}; flags look like --name=value",
                  file=sys.stderr)
            sys.exit(2)
        quiet_background_reports()
        try:
            cache = None
            if "compilation_cache" in FLAGS and FLAGS.compilation_cache:
                cache = compile_cache.enable(FLAGS.compilation_cache_dir or None)
            result = main(argv)
            if cache is not None:
                print(cache.describe(), flush=True)
            sys.stdout.flush()   # here, not at exit, so a closed pipe is caught below
            return result
        except user_errors() as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except WriteError as e:
            print(f"error: {e}", file=sys.stderr)
            end_now(2)
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
