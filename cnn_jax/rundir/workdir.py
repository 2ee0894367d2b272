"""Run directories: the files a training run keeps, each written so a crash never leaves half of it.

A workdir holds one run:

    config.json        the resolved Config (rebuilds model, optimiser and data anywhere)
    metrics.jsonl      one JSON object per line: {"kind": "train", ...} every `log_every` steps,
                       {"kind": "epoch", ...} after each epoch
    results.json       final test loss/accuracy, per-class accuracy, confusion matrix
    checkpoints/<step>/  orbax checkpoints (see cnn_jax.rundir.checkpoint)
    plots/*.png        learning curves, conv1 filters, confusion matrix, misclassified images
    tensorboard/       scalar event files (with --tensorboard)

Every file is written to a temporary name in the same folder and moved into place
with `os.replace`, which is atomic on POSIX: a reader sees the old file or the new
one, never a torn one. `check` only reads; it runs before the data is loaded, and
`start` (the first write) runs after, under the run directory's lock (`cnn_jax.rundir.lock`),
and first clears the temporaries a failed or killed writer left behind.

A write that fails (disk full, read-only filesystem, run directory deleted) raises
`WriteError`, an OSError whose message is one line naming the file and the reason;
the file it was replacing is untouched.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
from typing import Any, Iterable

from cnn_jax import config as config_lib
from cnn_jax import model as model_lib
from cnn_jax.rundir import readers
from cnn_jax.config import Config, ConfigError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE, CHECKPOINT_DIR, PLOTS_DIR, TENSORBOARD_DIR)

# Fields a resumed run may change: the `resumable` role (`config.ROLES`, declared with each field).
RESUMABLE_FIELDS = frozenset(config_lib.fields_with_role("resumable"))


# Temporaries of atomic writes (`.<name>.tmp-<pid>`): what a failed or killed writer can leave.
TEMPORARY_PATTERN = ".*.tmp-*"


class WriteError(OSError):
    """A file could not be written (disk full, read-only filesystem, folder gone); one line for the user."""


def write_error(path: str, error: OSError) -> WriteError:
    """`error` (raised writing `path`) as a one-line WriteError naming the file and the reason."""
    if isinstance(error, WriteError):
        return error
    return WriteError(f"cannot write {path} ({error.strerror or error})")


def temporary_path(path: str) -> str:
    """Where an atomic write of `path` writes first: `.<name>.tmp-<pid>` beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")


def remove_quietly(path: str) -> None:
    """Remove a temporary file if it is there; a failure leaves it for the next start to clear."""
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` via a temporary file + fsync + `os.replace` (WriteError on failure)."""
    tmp = temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        remove_quietly(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def clear_leftovers(workdir: str) -> list[str]:
    """Delete the temporaries of failed or killed writes in `workdir` and its plots; return them.

    Only call it while holding the run directory's lock: then no other writer is using them.
    (Orbax's half-written `<step>.orbax-checkpoint-tmp` folders are cleared when a writer opens
    the checkpoints, `checkpoint.open_manager`.)
    """
    found = []
    for folder in (workdir, os.path.join(workdir, PLOTS_DIR)):
        for path in glob.glob(os.path.join(glob.escape(folder), TEMPORARY_PATTERN)):
            if os.path.isfile(path):
                os.remove(path)
                found.append(path)
    return found


def write_json(path: str, value: Any) -> None:
    """Atomically write `value` as indented JSON (NaN/inf are refused: they are not JSON)."""
    atomic_write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")


# How to mend a damaged file of a run directory (the end of its one-line error).
DAMAGED_RUN_FILE = "the run directory is damaged: restore the file from a copy, or start a new --workdir"
DAMAGED_METRICS = "the file is damaged: delete that line (or the file, losing the curves)"

# The fields of metrics.jsonl's records that their readers use (plots, resume), by kind. An epoch
# record also holds the loss and accuracy of one held-out split (`epoch_fields`): the test set's
# (a training run, a sweep's run) or a validation split's (a search's trial, which also writes an
# "evaluation" record at each of its evaluations).
TRAIN_FIELDS = {"step": readers.COUNT, "loss": readers.NUMBER}
EPOCH_FIELDS = {"epoch": readers.COUNT, "step": readers.COUNT, "train_loss": readers.NUMBER,
                "train_accuracy": readers.NUMBER}
EVALUATION_FIELDS = {"step": readers.COUNT, "validation_loss": readers.NUMBER,
                     "validation_accuracy": readers.NUMBER}
RECORD_FIELDS = {"train": TRAIN_FIELDS, "epoch": EPOCH_FIELDS, "evaluation": EVALUATION_FIELDS}


def held_out_split(record: dict[str, Any]) -> str:
    """The split whose loss and accuracy an epoch record holds: "test", or "validation" when it
    has no test accuracy (`train.RunLog.finish_epoch` names them)."""
    return "test" if "test_accuracy" in record else "validation"


def epoch_fields(record: dict[str, Any]) -> dict[str, readers.Kind]:
    """The fields an epoch record must hold: `EPOCH_FIELDS` and its held-out split's loss and accuracy."""
    split = held_out_split(record)
    return {**EPOCH_FIELDS, f"{split}_loss": readers.NUMBER, f"{split}_accuracy": readers.NUMBER}


# An epoch record, as a checkpoint's history holds them.
EPOCH_RECORD = readers.Kind("an epoch record", lambda v: isinstance(v, dict) and all(
    f in v and kind.accepts(v[f]) for f, kind in epoch_fields(v).items()))


def read_json(path: str, fix: str = DAMAGED_RUN_FILE) -> Any:
    """Read a JSON file; any damage (unreadable, empty, not UTF-8, not JSON) is a one-line ConfigError."""
    return readers.read_json(path, fix=fix)


def read_config(workdir: str) -> Config:
    """The Config a run was started with (its config.json), validated."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.isfile(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a run directory")
    if not os.path.exists(path):
        raise ConfigError(f"--workdir={workdir} holds no run ({CONFIG_FILE} not found); "
                          "give the folder a training run wrote with --workdir")
    values = readers.check_object(read_json(path), path, DAMAGED_RUN_FILE, "a JSON object of config fields")
    try:
        return model_lib.validate(config_lib.from_dict(values))
    except ConfigError as e:
        raise readers.fail(path, str(e), "correct the file, or start a new --workdir") from None


def holds_run(workdir: str) -> bool:
    """Whether `workdir` already holds a run (its config or checkpoints)."""
    return any(os.path.exists(os.path.join(workdir, name)) for name in (CONFIG_FILE, CHECKPOINT_DIR))


def config_differences(stored: Config, given: Config, ignore: Iterable[str] = ()) -> list[str]:
    """`--name=given (run has stored)` for every field that differs, except those in `ignore`."""
    shown = lambda value: list(value) if isinstance(value, tuple) else value   # noqa: E731 - as in config.json
    skip = set(ignore)
    names = [f.name for f in dataclasses.fields(given) if f.name not in skip]
    return [f"--{name}={shown(getattr(given, name))} (the run has {shown(getattr(stored, name))})"
            for name in names if getattr(given, name) != getattr(stored, name)]


def resume_config(workdir: str, given: Config, present: Iterable[str]) -> Config:
    """The config of a resumed run: its config.json, with the flags given on the command line applied.

    Only `RESUMABLE_FIELDS` may change; a flag that would change the computation is refused.
    Without a config.json the given config is returned (a fresh run).
    """
    if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        return given
    stored = read_config(workdir)
    merged = config_lib.replace(stored, **{name: getattr(given, name) for name in present})
    changed = config_differences(stored, merged, ignore=RESUMABLE_FIELDS)
    if changed:
        raise ConfigError(f"--resume keeps the run's config in {workdir}: {changed[0]} cannot change; "
                          "drop the flag, or start a new --workdir")
    return model_lib.validate(merged)


def check_target(workdir: str, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse flags that exclude each other and a workdir that is a file (one-line ConfigError):
    what `check` refuses before the run's lock creates the folder."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run "
                          f"in {workdir}, --overwrite deletes it")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory")


def check(workdir: str, config: Config, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse, before anything is written, a workdir that cannot take this run (one-line ConfigError).

    A workdir holding another run is refused unless `resume` (continue it; its config must
    match `config` up to `RESUMABLE_FIELDS`) or `overwrite` (replace it).
    """
    check_target(workdir, resume, overwrite)
    if not holds_run(workdir):
        return
    if not resume and not overwrite:
        raise ConfigError(f"--workdir={workdir} already holds a run ({CONFIG_FILE}); pass --resume to "
                          "continue it, --overwrite to replace it, or choose another --workdir")
    if resume and os.path.exists(os.path.join(workdir, CONFIG_FILE)):
        changed = config_differences(read_config(workdir), config, ignore=RESUMABLE_FIELDS)
        if changed:
            raise ConfigError(f"--resume keeps the run's config in {workdir}: {changed[0]} cannot change; "
                              "drop the flag, or start a new --workdir")


def start(workdir: str, config: Config, overwrite: bool = False) -> None:
    """Create the workdir (deleting the previous run's files with `overwrite`) and write config.json.

    Temporaries left by a failed or killed write are deleted first (the caller holds the lock).
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        clear_leftovers(workdir)
        if overwrite:
            for name in RUN_ENTRIES:
                path = os.path.join(workdir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
    except OSError as e:
        raise write_error(e.filename or workdir, e) from None
    write_json(os.path.join(workdir, CONFIG_FILE), config_lib.to_dict(config))


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (an empty list when there is none), each checked to be a
    "train", "epoch" or "evaluation" record holding the fields its readers use (`RECORD_FIELDS`,
    `epoch_fields`)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    for number, value in readers.read_json_lines(path, DAMAGED_METRICS):
        where = f"{path}: line {number}"
        record = readers.check_fields(value, {"kind": readers.one_of(*RECORD_FIELDS)}, where, DAMAGED_METRICS)
        fields = epoch_fields(record) if record["kind"] == "epoch" else RECORD_FIELDS[record["kind"]]
        records.append(readers.check_fields(record, fields, where, DAMAGED_METRICS))
    return records


class MetricsLog:
    """metrics.jsonl kept in memory and rewritten atomically.

    `append` buffers; the file is rewritten at most every `flush_seconds` and on `flush`
    (the training loop flushes at each epoch end, checkpoint and exit). On resume, records
    after the restored step are dropped: the resumed run writes them again.
    """

    def __init__(self, workdir: str, keep_until_step: int | None = None, flush_seconds: float = 10.0,
                 write: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        records = read_metrics(workdir) if keep_until_step is not None else []
        self.records = [r for r in records if r.get("step", 0) <= (keep_until_step or 0)]
        self.flush_seconds = flush_seconds
        self.write = write   # False: keep records in memory only (a non-primary process)
        self._dirty = True
        self._last_flush = time.monotonic()
        self.flush()

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self._dirty and self.write:
            atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records))
            self._dirty = False
            self._last_flush = time.monotonic()
