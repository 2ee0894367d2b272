"""Checkpoints: exact round trip, latest step, refusal of non-finite state, damage, SIGKILL mid-write."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from contextlib import closing

import jax
import numpy as np
import pytest

from cnn_jax import checkpoint, model, optim, state
from cnn_jax import config as config_lib
from cnn_jax import workdir as workdir_lib
from cnn_jax.config import Config

CONFIG = config_lib.replace(Config(), optimizer="adam", schedule="cosine")


def state_at(step, config=CONFIG):
    """A distinct, reproducible TrainState at `step` (params drawn from key(step))."""
    fresh = state.create(config_lib.replace(config, seed=step), optim.make_optimizer(config, 100))
    return jax.device_get(fresh.replace(step=np.int32(step)))


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_round_trip_is_exact_and_keeps_the_optimiser_structure(tmp_path):
    workdir = str(tmp_path)
    saved = state_at(3)
    meta = {"step": 3, "moving_loss": 0.1234567890123, "epoch_losses": [2.5, 1.25]}
    with closing(checkpoint.open_manager(workdir)) as manager:
        assert checkpoint.save(manager, saved, meta)
        assert not checkpoint.save(manager, saved, meta)  # an existing step is kept
    restored, restored_meta = checkpoint.restore(workdir, CONFIG)
    assert leaves_equal(saved, restored)
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    assert restored_meta == {"format": checkpoint.FORMAT, **meta}
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(restored))


def test_latest_step_and_the_newest_are_kept(tmp_path):
    workdir = str(tmp_path)
    assert checkpoint.latest_step(workdir) is None
    with closing(checkpoint.open_manager(workdir)) as manager:
        for step in (1, 2, 3, 4):
            checkpoint.save(manager, state_at(step), {"step": step})
    assert checkpoint.latest_step(workdir) == 4
    assert sorted(os.listdir(checkpoint.checkpoint_dir(workdir))) == ["2", "3", "4"]
    restored, meta = checkpoint.restore(workdir, CONFIG, step=2)
    assert meta["step"] == 2 and leaves_equal(restored, state_at(2))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint for step 1; available: 2, 3, 4"):
        checkpoint.restore(workdir, CONFIG, step=1)


def test_non_finite_state_is_refused_and_the_last_good_one_kept(tmp_path):
    workdir = str(tmp_path)
    good = state_at(1)
    bad = jax.tree.map(lambda x: np.array(x), state_at(2))
    bad.params["dense1"]["w"][0, 0] = np.inf
    with closing(checkpoint.open_manager(workdir)) as manager:
        checkpoint.save(manager, good, {"step": 1})
        with pytest.raises(FloatingPointError, match="not finite at step 2"):
            checkpoint.save(manager, bad, {"step": 2})
    assert checkpoint.latest_step(workdir) == 1 and os.listdir(checkpoint.checkpoint_dir(workdir)) == ["1"]


# Orbax leaves coroutines of the failed read to the garbage collector, which complain about their
# closed event loop; they are collected (and their warning ignored) inside this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_mismatched_and_damaged_checkpoints_are_one_line_errors(tmp_path):
    workdir = str(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found"):
        checkpoint.restore(workdir, CONFIG)
    with closing(checkpoint.open_manager(workdir)) as manager:
        checkpoint.save(manager, state_at(5), {"step": 5})
    other = config_lib.replace(CONFIG, num_fc=64)
    with pytest.raises(checkpoint.CheckpointError, match=r"\['dense1'\]\['b'\] is float32\[128\] but "
                                                         r"the config gives float32\[64\]") as error:
        checkpoint.restore(workdir, other)
    assert "\n" not in str(error.value)
    with pytest.raises(checkpoint.CheckpointError, match="another config"):
        checkpoint.restore(workdir, config_lib.replace(CONFIG, optimizer="sgd"))
    state_dir = os.path.join(checkpoint.checkpoint_dir(workdir), "5", "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            if name != "_METADATA" and "metadata" not in root:
                open(os.path.join(root, name), "wb").write(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.restore(workdir, CONFIG)
    gc.collect()


def damage(workdir, step):
    """Overwrite every array file of checkpoint `step` (its metadata stays readable)."""
    state_dir = os.path.join(checkpoint.checkpoint_dir(workdir), str(step), "state")
    for root, _, files in os.walk(state_dir):
        for name in files:
            if name != "_METADATA" and "metadata" not in root:
                open(os.path.join(root, name), "wb").write(b"garbage")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failed_restore_names_the_older_checkpoints_and_silences_orbax_echoes(tmp_path, monkeypatch):
    """Orbax's abandoned reads report `RuntimeError('Event loop is closed')` through
    sys.unraisablehook, or tensorstore's PyErr_Print through sys.excepthook (tracebacks on
    stderr after the one-line error); only those are dropped, on both hooks."""
    workdir = str(tmp_path)
    with closing(checkpoint.open_manager(workdir)) as manager:
        for step in (4, 8):
            checkpoint.save(manager, state_at(step), {"step": step})
    damage(workdir, 8)
    reported, excepted = [], []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, tb: excepted.append(error))
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/8: cannot restore .* damaged .*"
                                                         r"other checkpoints here: 4 \(choose one with --step"):
        checkpoint.restore(workdir, CONFIG)
    gc.collect()
    reported.clear()
    echo = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(echo)
    sys.unraisablehook(other)
    assert reported == [other]
    excepted.clear()
    for error in (echo.exc_value, other.exc_value):
        sys.excepthook(RuntimeError, error, None)
    assert excepted == [other.exc_value]
    restored, meta = checkpoint.restore(workdir, CONFIG, step=4)          # the older one is intact
    assert meta["step"] == 4 and leaves_equal(restored, state_at(4))


def test_restore_run_rebuilds_from_config_json_alone(tmp_path):
    workdir = str(tmp_path)
    workdir_lib.start(workdir, CONFIG)
    with closing(checkpoint.open_manager(workdir)) as manager:
        checkpoint.save(manager, state_at(7), {"step": 7})
    config, restored, meta = checkpoint.restore_run(workdir, data_dir="/elsewhere/mnist")
    assert config == config_lib.replace(CONFIG, data_dir="/elsewhere/mnist")
    assert meta["step"] == 7 and leaves_equal(restored, state_at(7))


WRITER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from cnn_jax import checkpoint, optim, state
    from cnn_jax import config as config_lib
    config = config_lib.replace(config_lib.Config(), optimizer="adam", schedule="cosine", num_fc=1024)
    manager = checkpoint.open_manager(sys.argv[1])
    step = (manager.latest_step() or 0) + 1
    while True:
        fresh = state.create(config_lib.replace(config, seed=step), optim.make_optimizer(config, 100))
        checkpoint.save(manager, fresh.replace(step=np.int32(step)), {"step": step})
        print(step, flush=True)
        step += 1
""")


def test_sigkill_mid_write_leaves_the_previous_checkpoint_readable(tmp_path):
    """A writer saving back to back (~5 MB each) is killed at several moments, each time restored."""
    workdir = str(tmp_path)
    config = config_lib.replace(CONFIG, num_fc=1024)
    caught_mid_write = 0
    # Kill at spread-out moments until one lands inside a write (where a save's time goes varies
    # with the machine's load), every kill checked; at least two kills.
    for attempt, delay in enumerate((0.05, 0.3, 0.15, 0.5, 0.1, 0.8, 0.2, 0.03)):
        if attempt >= 2 and caught_mid_write:
            break
        proc = subprocess.Popen([sys.executable, "-c", WRITER, workdir], stdout=subprocess.PIPE, text=True)
        last_printed = int(proc.stdout.readline())   # one save finished
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        rest = proc.communicate()[0].split()
        last_printed = int(rest[-1]) if rest else last_printed
        leftovers = [n for n in os.listdir(checkpoint.checkpoint_dir(workdir)) if "tmp" in n]
        caught_mid_write += bool(leftovers)
        latest = checkpoint.latest_step(workdir)
        assert latest >= last_printed
        restored, meta = checkpoint.restore(workdir, config)
        assert meta["step"] == latest
        assert leaves_equal(restored.params, jax.device_get(model.init(jax.random.key(latest), config)[0]))
    assert caught_mid_write >= 1, "no kill landed inside a checkpoint write"


# ---------------------------------------------------------------- run directories of the format before the train state


def write_old_format_checkpoint(workdir, step, params, bare_opt_state, meta):
    """A checkpoint exactly as the code before the train state wrote it: item `state` =
    {"params", "opt_state": [leaves of the bare optax state]}, item `meta` without "format"."""
    import orbax.checkpoint as ocp
    with closing(checkpoint.open_manager(workdir)) as manager:
        arrays = {"params": jax.device_get(params), "opt_state": list(jax.device_get(jax.tree.leaves(bare_opt_state)))}
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                   meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()


def write_old_format_config(workdir, config):
    """config.json as the code before the model registry wrote it: no "model" field."""
    import json
    values = config_lib.to_dict(config)
    del values["model"]
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "w") as f:
        json.dump(values, f, indent=2)


def test_a_checkpoint_of_the_format_before_the_train_state_is_migrated_on_read(tmp_path):
    workdir = str(tmp_path)
    fresh = state_at(0)
    params, bare = fresh.params, fresh.opt_state.inner_state
    write_old_format_config(workdir, CONFIG)
    write_old_format_checkpoint(workdir, 12, params, bare, {"step": 12, "history": []})
    config, restored, meta = checkpoint.restore_run(workdir)
    assert config == CONFIG and "format" not in meta
    assert leaves_equal(restored.params, params) and leaves_equal(restored.opt_state.inner_state, bare)
    assert int(restored.opt_state.count) == 12 and int(restored.step) == 12
    assert float(restored.opt_state.hyperparams["learning_rate"]) == np.float32(CONFIG.learning_rate)
    np.testing.assert_array_equal(restored.rng, state.run_rng(CONFIG))
    assert restored.model_state == {}
    # The migrated state is the state the current code keeps, leaf for leaf in structure.
    assert jax.tree.structure(restored) == jax.tree.structure(jax.device_get(fresh))


def test_a_run_directory_of_the_format_before_resumes_bit_exactly_and_evaluates(mnist, tmp_path):
    """A run directory as the code before the train state left it after epoch 0 (config.json
    without "model", a checkpoint of (params, bare optimiser state) + meta, metrics.jsonl)
    evaluates, and resumes to what an uninterrupted run computes."""
    import dataclasses
    from cnn_jax import report, run, train
    tiny = dataclasses.replace(mnist, train_images=mnist.train_images[:640], train_labels=mnist.train_labels[:640],
                               test_images=mnist.test_images[:200], test_labels=mnist.test_labels[:200])
    config = config_lib.replace(Config(), epochs=2, loop="step", train_eval="running", log_every=5)
    epochs = []
    hooks = train.Hooks(on_epoch=lambda s, log, record: epochs.append((jax.device_get(s), log.history[:])))
    _, whole = train.fit(config, tiny, hooks=hooks)
    after_first, history = epochs[0]
    workdir = str(tmp_path / "old_run")
    write_old_format_config(workdir, config)
    workdir_lib.MetricsLog(workdir).append({"kind": "epoch", **history[0]})
    meta = {**run.checkpoint_meta(train.RunLog(step=10, moving_loss=history[0]["moving_loss"], history=history),
                                  config, 10)}
    write_old_format_checkpoint(workdir, 10, after_first.params, after_first.opt_state.inner_state, meta)

    _, restored, _ = checkpoint.restore_run(workdir)
    result = report.evaluate_test(restored.params, restored.model_state, tiny, config)
    assert result["accuracy"] == history[0]["test_accuracy"]
    resumed = run.train_and_evaluate(config, workdir, dataset=tiny, resume=True)
    strip = lambda records: [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_second")}
                             for r in records]   # noqa: E731
    assert strip(resumed) == strip(whole)
    assert checkpoint.restore(workdir, config)[1]["format"] == checkpoint.FORMAT   # written anew
