"""Checkpoints of a run with orbax-checkpoint: save, find the latest, restore on any machine.

A checkpoint is `<workdir>/checkpoints/<step>/`, `step` being the number of training
steps done. It has two items:

  state   the TrainState's arrays: {"params": params, "opt_state": [leaves of the optimiser
          state], "model_state": [its leaves] (only when the model has any), "rng": key
          data, "step": step}
  meta    JSON: "format": FORMAT, step, epoch, moving loss, the current epoch's per-step
          losses and correct counts (so a mid-epoch checkpoint resumes exactly), the
          per-epoch history, and the config.

Checkpoints written before the train state existed (no "format" in meta; state
{"params", "opt_state": [leaves of the bare optimiser's state]}) are migrated on read: the
tutorial's CNN was the only model, with no model state and no randomness, so the optimiser
state is wrapped as `optim.make_optimizer` holds it now and the rng is the run's seed's, and
such a run evaluates and resumes bit-exactly.

Saving is synchronous. Orbax writes a step into a temporary folder and renames it into
place when complete, so a process killed mid-write leaves only a temporary folder,
which `latest_step` ignores: the previous checkpoint stays the latest readable one.
A save that fails (disk full, read-only filesystem, run directory deleted) raises
`workdir.WriteError` in one line and removes what it had written; whatever it could not
remove is cleared by the next writer (`open_manager`).
Restoring reads into the structure of the run's fresh state (built from the config, or the
one the training session already drew) as plain NumPy arrays, so a checkpoint written on a
GPU machine restores on a CPU-only one.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import jax
import numpy as np

from cnn_jax import config as config_lib
from cnn_jax.engine import optim, state as state_lib
from cnn_jax.engine.runlog import RunLog
from cnn_jax.rundir import readers
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.config import Config, ConfigError
from cnn_jax.data.sources import DataError

KEEP_CHECKPOINTS = 3   # the newest N checkpoints are kept; older ones are deleted
FORMAT = 2             # meta["format"] of checkpoints holding a whole TrainState; none before

# The fields of a training run's meta item that resuming and evaluating read (`checkpoint_meta`
# writes them); `history` holds the epoch records of metrics.jsonl.
RUN_META_FIELDS = {"step": readers.COUNT, "steps_per_epoch": readers.POSITIVE,
                   "moving_loss": readers.NUMBER_OR_NULL, "epoch_losses": readers.list_of(readers.NUMBER),
                   "epoch_correct": readers.COUNT,
                   "history": readers.list_of(workdir_lib.EPOCH_RECORD)}


class CheckpointError(DataError):
    """A checkpoint is missing, damaged or does not fit the config; one line for the user."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), workdir_lib.CHECKPOINT_DIR)


def open_manager(workdir: str, create: bool = True):
    """A synchronous orbax CheckpointManager for `<workdir>/checkpoints` keeping `KEEP_CHECKPOINTS`."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers

    # cleanup_tmp_directories: a writer removes what a killed writer left half-written.
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False, create=create, cleanup_tmp_directories=create,
        preservation_policy=checkpoint_managers.LatestN(KEEP_CHECKPOINTS))
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` is finite."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return all(bool(np.all(np.isfinite(x))) for x in leaves if np.issubdtype(x.dtype, np.inexact))


def _arrays(state: state_lib.TrainState) -> dict[str, Any]:
    """The checkpoint's array item for `state` (optimiser and model state as lists of leaves)."""
    arrays = {"params": state.params, "opt_state": list(jax.tree.leaves(state.opt_state)),
              "rng": state.rng, "step": state.step}
    if jax.tree.leaves(state.model_state):
        arrays["model_state"] = list(jax.tree.leaves(state.model_state))
    if state.ema is not None:
        arrays["ema"] = state.ema
    return arrays


def save(manager, state: state_lib.TrainState, meta: dict[str, Any]) -> bool:
    """Write checkpoint `state.step` and wait until it is on disk; False if that step already exists.

    A non-finite train state raises FloatingPointError and writes nothing, so the last good
    checkpoint is never replaced by a diverged one.
    """
    import orbax.checkpoint as ocp

    step = int(state.step)
    if not all_finite(state):
        raise FloatingPointError(f"parameters or optimiser state are not finite at step {step}; "
                                 "checkpoint not written")
    if step in manager.all_steps():
        return False
    where = os.fspath(manager.directory)
    if not os.path.isdir(os.path.dirname(where)):   # orbax would recreate a deleted run directory
        raise workdir_lib.WriteError(f"cannot write checkpoint {step}: the run directory "
                                     f"{os.path.dirname(where)} no longer exists")
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_arrays(state)),
                                                   meta=ocp.args.JsonSave({"format": FORMAT, **meta})))
        manager.wait_until_finished()
    except Exception as e:  # orbax and tensorstore report write failures as several types
        reason = write_failure_reason(e)
        if reason is None:
            raise
        for partial in os.listdir(where) if os.path.isdir(where) else []:
            if partial.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(where, partial), ignore_errors=True)
        raise workdir_lib.WriteError(f"cannot write checkpoint {step} in {where} ({reason})") from None
    return True


# Tensorstore's status codes for a failed write, and the errno it appends to the message.
_WRITE_STATUS = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "NOT_FOUND", "UNAVAILABLE", "FAILED_PRECONDITION")
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def write_failure_reason(error: BaseException) -> str | None:
    """`No space left on device` for an error orbax raised while writing to disk; None for any other."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    code = _OS_ERROR_CODE.search(text)
    if code:
        return os.strerror(int(code.group(1)))
    if text.startswith(_WRITE_STATUS):
        return (text.splitlines() or [text])[0][:200]
    return None


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint's step, or None when there is none."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    manager = open_manager(workdir, create=False)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def fresh_state(config: Config) -> state_lib.TrainState:
    """The TrainState a fresh run of `config` starts from: what a checkpoint of it must match."""
    return state_lib.create(config, optim.make_optimizer(config, total_steps=1))


def _zeros(tree: Any) -> Any:
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)


def _target(like: state_lib.TrainState, meta: dict[str, Any]) -> dict[str, Any]:
    """What to read for a checkpoint with `meta`, shaped like the state `like`: the arrays of a
    TrainState, or, for a checkpoint of the format before it, params and the bare optimiser's
    state leaves."""
    if "format" not in meta:
        inner = like.opt_state.inner_state
        return {"params": _zeros(like.params), "opt_state": [_zeros(s) for s in jax.tree.leaves(inner)]}
    return _arrays(_zeros(like))


def _state_from(arrays: dict[str, Any], like: state_lib.TrainState, meta: dict[str, Any]) -> state_lib.TrainState:
    """The TrainState of restored arrays; a checkpoint of the format before it is migrated (its
    optimiser hyperparameters and rng are those of the fresh state `like`)."""
    if "format" not in meta:
        step = np.int32(meta["step"])
        inner = jax.tree.unflatten(jax.tree.structure(like.opt_state.inner_state), arrays["opt_state"])
        opt_state = like.opt_state._replace(count=np.asarray(step), inner_state=inner,
                                            hyperparams=jax.tree.map(np.asarray, like.opt_state.hyperparams))
        return state_lib.TrainState(arrays["params"], opt_state, {}, np.asarray(like.rng), np.asarray(step))
    opt_state = jax.tree.unflatten(jax.tree.structure(like.opt_state), arrays["opt_state"])
    model_state = jax.tree.unflatten(jax.tree.structure(like.model_state), arrays.get("model_state", []))
    return state_lib.TrainState(arrays["params"], opt_state, model_state, arrays["rng"], arrays["step"],
                                arrays.get("ema"))


def restore(workdir: str, config: Config, step: int | None = None,
            meta_fields: dict[str, readers.Kind] | None = None) -> tuple[state_lib.TrainState, dict[str, Any]]:
    """(TrainState, meta) of checkpoint `step` (default: the latest) of a run of `config`, as NumPy
    arrays (`restore_like` with the config's fresh state)."""
    return restore_like(workdir, fresh_state(config), step, meta_fields)


def restore_like(workdir: str, like: state_lib.TrainState, step: int | None = None,
                 meta_fields: dict[str, readers.Kind] | None = None) -> tuple[state_lib.TrainState, dict[str, Any]]:
    """(TrainState, meta) of checkpoint `step` (default: the latest), as NumPy arrays, checked
    to have the structure, shapes and dtypes of `like` (a fresh state of the run's config).

    The meta item must be a JSON object; with `meta_fields` (e.g. `RUN_META_FIELDS`) those
    fields must be there and of their kinds. Any other meta is a one-line CheckpointError.
    """
    import orbax.checkpoint as ocp

    where = checkpoint_dir(workdir)
    manager = open_manager(workdir, create=False) if os.path.isdir(where) else None
    steps = manager.all_steps() if manager else []
    if not steps or (step is not None and step not in steps):
        if manager:
            manager.close()
        if not steps:
            raise CheckpointError(f"{where}: no checkpoint found; train with --workdir={workdir} first")
        raise CheckpointError(f"{where}: no checkpoint for step {step}; "
                              f"available: {', '.join(map(str, sorted(steps)))}")
    if step is None:
        step = manager.latest_step()
    def cannot_restore(e: Exception) -> CheckpointError:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return CheckpointError(f"{where}/{step}: cannot restore ({type(e).__name__}: {first_line}); "
                               "the checkpoint is damaged or was written with another config"
                               f"{_older_checkpoints_hint(where, steps, step)}")

    try:
        try:   # the meta item first: it says which layout the arrays have
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for damaged checkpoints
            raise cannot_restore(e) from None
        meta = _check_meta(meta, f"{where}/{step}/meta", step, meta_fields,
                           "the checkpoint is damaged" + _older_checkpoints_hint(where, steps, step))
        if meta.get("format", FORMAT) != FORMAT:
            raise CheckpointError(f"{where}/{step}: checkpoint format {meta['format']!r} is not known to this "
                                  f"version (it reads {FORMAT} and the format before it); use the version "
                                  "that wrote it")
        target = _target(like, meta)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # orbax raises many types for damaged or mismatched checkpoints
            raise cannot_restore(e) from None
    finally:
        manager.close()
    arrays = jax.tree.map(np.asarray, restored["state"])
    _check_matches(arrays, target, f"{where}/{step}")
    return _state_from(arrays, like, meta), meta


def _older_checkpoints_hint(where: str, steps: list[int], step: int) -> str:
    others = sorted(s for s in steps if s != step)
    return (f"; other checkpoints here: {', '.join(map(str, others))} (choose one with --step; "
            f"--resume takes the newest, so move {step} out of {where} first)" if others else "")


def _check_meta(meta: Any, where: str, step: int, fields: dict[str, readers.Kind] | None,
                fix: str) -> dict[str, Any]:
    """The meta item as a dict, its `fields` checked (and its step equal to the checkpoint's)."""
    try:
        meta = readers.check_fields(meta, fields or {}, where, fix)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if fields and "step" in fields and meta["step"] != step:
        raise CheckpointError(f"{where}: \"step\" is {meta['step']}, not the checkpoint's step {step}; {fix}")
    return dict(meta)


def _check_matches(state: Any, target: Any, where: str) -> None:
    """Orbax returns what was saved even when it differs from the target: compare leaf by leaf."""
    got = dict(jax.tree_util.tree_leaves_with_path(state))
    want = dict(jax.tree_util.tree_leaves_with_path(target))
    for path in sorted(set(got) | set(want), key=lambda p: (str(p[0]) != "['params']", str(p))):
        name = jax.tree_util.keystr(path)
        if path not in got or path not in want:
            raise CheckpointError(f"{where}: {'missing' if path not in got else 'unexpected'} array {name}; "
                                  "the checkpoint was written with another config (model or optimiser)")
        if got[path].shape != want[path].shape or got[path].dtype != want[path].dtype:
            raise CheckpointError(f"{where}: {name} is {got[path].dtype}{list(got[path].shape)} but the "
                                  f"config gives {want[path].dtype}{list(want[path].shape)}; the checkpoint "
                                  "was written with another config")


def restore_run(workdir: str, step: int | None = None,
                data_dir: str | None = None) -> tuple[Config, state_lib.TrainState, dict[str, Any]]:
    """(config, TrainState, meta) of a saved run, rebuilt from its config.json and checkpoint alone.

    `data_dir` replaces the run's data folder (a run trained on another machine).
    """
    config = workdir_lib.read_config(workdir)
    if data_dir is not None:
        config = config_lib.replace(config, data_dir=data_dir)
    state, meta = restore(workdir, config, step, meta_fields=RUN_META_FIELDS)
    return config, state, meta


def checkpoint_meta(log: RunLog, config: Config, steps_per_epoch: int) -> dict[str, Any]:
    """The JSON part of a checkpoint: everything besides arrays that resuming needs."""
    return {
        "step": log.step, "epoch": log.step // steps_per_epoch,
        "step_in_epoch": log.step % steps_per_epoch, "steps_per_epoch": steps_per_epoch,
        "moving_loss": log.moving_loss, "epoch_losses": log.epoch_losses,
        "epoch_correct": log.epoch_correct, "history": log.history,
        "config": config_lib.to_dict(config),
    }


def restore_state(workdir: str, like: state_lib.TrainState,
                  steps_per_epoch: int) -> tuple[state_lib.TrainState, RunLog] | None:
    """The (TrainState, RunLog) of the workdir's latest checkpoint, or None when it has none;
    `like` is the run's fresh state (its structure, shapes and dtypes are the checkpoint's)."""
    if latest_step(workdir) is None:
        return None
    state, meta = restore_like(workdir, like, meta_fields=RUN_META_FIELDS)
    if meta.get("steps_per_epoch") != steps_per_epoch:
        raise ConfigError(f"the checkpoint in {workdir} has {meta.get('steps_per_epoch')} steps per epoch "
                          f"but this config gives {steps_per_epoch}: the data or --batch_size differ")
    return state, RunLog(step=meta["step"], moving_loss=meta["moving_loss"],
                         epoch_losses=list(meta["epoch_losses"]), epoch_correct=meta["epoch_correct"],
                         history=list(meta["history"]))
