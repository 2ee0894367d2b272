"""Checkpoints: exact round trip, latest step, refusal of non-finite state, damage, SIGKILL mid-write."""

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.config import Config
from cnn_jax.engine import optim, state
from cnn_jax.rundir import checkpoint
from cnn_jax.rundir import workdir as workdir_lib
from test_readers import PROPERTY, damaged, json_values, value_or_one_line_error

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
def test_a_failed_restore_names_the_older_checkpoints(tmp_path):
    """(The echoes orbax's abandoned reads print are dropped by the scripts: test_cli.)"""
    workdir = str(tmp_path)
    with closing(checkpoint.open_manager(workdir)) as manager:
        for step in (4, 8):
            checkpoint.save(manager, state_at(step), {"step": step})
    damage(workdir, 8)
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/8: cannot restore .* damaged .*"
                                                         r"other checkpoints here: 4 \(choose one with --step"):
        checkpoint.restore(workdir, CONFIG)
    gc.collect()
    restored, meta = checkpoint.restore(workdir, CONFIG, step=4)          # the older one is intact
    assert meta["step"] == 4 and leaves_equal(restored, state_at(4))


def run_meta(step, steps_per_epoch=7):
    """The meta of a training run's checkpoint at the end of an epoch (what `checkpoint.checkpoint_meta` writes)."""
    return {"format": checkpoint.FORMAT, "step": step, "steps_per_epoch": steps_per_epoch, "moving_loss": 0.5,
            "epoch_losses": [], "epoch_correct": 0, "history": []}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_library_code_leaves_the_process_hooks_alone(tmp_path):
    """Process-wide hooks are the scripts' (cli.main_guard); a failed restore or save changes none."""
    hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)
    workdir = str(tmp_path)
    with closing(checkpoint.open_manager(workdir)) as manager:
        checkpoint.save(manager, state_at(8), {"step": 8})
    damage(workdir, 8)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.restore(workdir, CONFIG)
    gc.collect()
    assert (sys.excepthook, sys.unraisablehook, threading.excepthook) == hooks


def test_write_failure_reason_reads_orbax_and_tensorstore_errors():
    assert checkpoint.write_failure_reason(OSError(30, "Read-only file system", "/x")) == "Read-only file system"
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "opt_state.1/0" in OCDBT database ...: '
                             "Failed to write 43504 bytes to file 17: No space left on device [os_error_code='28']")
    assert checkpoint.write_failure_reason(tensorstore) == os.strerror(28)
    assert checkpoint.write_failure_reason(ValueError("PERMISSION_DENIED: Error writing x\nmore")) == (
        "PERMISSION_DENIED: Error writing x")
    assert checkpoint.write_failure_reason(ValueError("shapes differ")) is None   # not a write failure


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_save_into_a_deleted_run_directory_is_refused_without_recreating_it(tmp_path):
    workdir = str(tmp_path / "run")
    manager = checkpoint.open_manager(workdir)
    checkpoint.save(manager, state_at(1), {"step": 1})
    import shutil
    shutil.rmtree(workdir)
    with pytest.raises(workdir_lib.WriteError, match=r"cannot write checkpoint 2: the run directory .*run "
                                                     r"no longer exists"):
        checkpoint.save(manager, state_at(2), {"step": 2})
    manager.close()
    assert not os.path.exists(workdir)


def test_restore_run_rebuilds_from_config_json_alone(tmp_path):
    workdir = str(tmp_path)
    workdir_lib.start(workdir, CONFIG)
    with closing(checkpoint.open_manager(workdir)) as manager:
        checkpoint.save(manager, state_at(7), run_meta(7))
    config, restored, meta = checkpoint.restore_run(workdir, data_dir="/elsewhere/mnist")
    assert config == config_lib.replace(CONFIG, data_dir="/elsewhere/mnist")
    assert meta["step"] == 7 and leaves_equal(restored, state_at(7))


WRITER = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from cnn_jax.rundir import checkpoint
    from cnn_jax.engine import optim, state
    from cnn_jax import config as config_lib
    config = config_lib.replace(config_lib.Config(), optimizer="adam", schedule="cosine", num_fc=1024)
    manager = checkpoint.open_manager(sys.argv[1])
    step = (manager.latest_step() or 0) + 1
    fresh = jax.device_get(state.create(config, optim.make_optimizer(config, 100)))
    while True:   # each save's params: seed 0's, plus the step (so a restore shows which save it is)
        params = jax.tree.map(lambda p: p + np.float32(step), fresh.params)
        checkpoint.save(manager, fresh.replace(params=params, step=np.int32(step)), {"step": step})
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
        seed0 = jax.device_get(model.init(jax.random.key(0), config)[0])
        assert leaves_equal(restored.params, jax.tree.map(lambda p: p + np.float32(latest), seed0))
    assert caught_mid_write >= 1, "no kill landed inside a checkpoint write"


# ----------------------------------------------------------------------------- the meta item read back


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory with one checkpoint (step 7); tests overwrite its meta item's file."""
    workdir = str(tmp_path_factory.mktemp("meta"))
    workdir_lib.start(workdir, CONFIG)
    with closing(checkpoint.open_manager(workdir)) as manager:
        checkpoint.save(manager, state_at(7), run_meta(7))
    meta_file = os.path.join(checkpoint.checkpoint_dir(workdir), "7", "meta", "metadata")
    assert json.load(open(meta_file)) == run_meta(7)   # where orbax keeps the meta item
    return workdir, meta_file


EPOCH = {"epoch": 0, "step": 7, "train_loss": 0.3, "train_accuracy": 0.9, "test_loss": 0.35, "test_accuracy": 0.88}


@pytest.mark.parametrize("data, fragment", [
    (b"", "checkpoints/7: cannot restore (JSONDecodeError"),
    (b"\xff" + json.dumps(run_meta(7)).encode(), "checkpoints/7: cannot restore (UnicodeDecodeError"),
    (json.dumps(run_meta(7)).encode()[:30], "checkpoints/7: cannot restore (JSONDecodeError"),
    (b"[1]", "checkpoints/7/meta: expected a JSON object, found a list of 1 values; the checkpoint is damaged"),
    (b"{}", 'checkpoints/7/meta: no "step" field'),
    (json.dumps({**run_meta(7), "step": "7"}).encode(), '"step" is \'7\', not a whole number >= 0'),
    (json.dumps({**run_meta(7), "step": 8}).encode(), "\"step\" is 8, not the checkpoint's step 7"),
    (json.dumps({**run_meta(7), "steps_per_epoch": 0}).encode(), '"steps_per_epoch" is 0, not a whole number >= 1'),
    (json.dumps({**run_meta(7), "moving_loss": "nan"}).encode(), '"moving_loss" is \'nan\', not a finite number'),
    (json.dumps({**run_meta(7), "moving_loss": float("nan")}).encode(), '"moving_loss" is nan, not a finite number'),
    (json.dumps({**run_meta(7), "epoch_losses": [1, None]}).encode(), "not a list of finite numbers"),
    (json.dumps({**run_meta(7), "history": [1]}).encode(), '"history" is [1], not a list of epoch records'),
    (json.dumps({**run_meta(7), "history": [{**EPOCH, "step": None}]}).encode(), "not a list of epoch records"),
], ids=["empty", "latin1", "truncated", "list", "no_step", "step_text", "other_step", "zero_steps_per_epoch",
        "loss_text", "loss_nan", "loss_null", "history_numbers", "history_record"])
def test_a_damaged_meta_item_is_one_line_naming_the_checkpoint(saved_run, data, fragment):
    workdir, meta_file = saved_run
    open(meta_file, "wb").write(data)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.restore_run(workdir)
    assert fragment in str(error.value) and "\n" not in str(error.value), error.value
    assert "the checkpoint is damaged" in str(error.value)


def test_a_good_meta_item_is_returned_whole(saved_run):
    workdir, meta_file = saved_run
    meta = {**run_meta(7), "moving_loss": None, "epoch_losses": [0.5, 2], "history": [EPOCH], "extra": [1]}
    open(meta_file, "w").write(json.dumps(meta))
    assert checkpoint.restore_run(workdir)[2] == meta


META_CHANGES = st.fixed_dictionaries({}, optional={
    # Mostly good values for the fields checked first, so that the later ones are reached too.
    "step": st.just(7) | st.just(7) | json_values, "steps_per_epoch": st.integers(1, 9) | json_values,
    "moving_loss": st.floats(0, 5) | json_values, "epoch_correct": st.integers(0, 9) | json_values,
    "epoch_losses": st.lists(json_values, max_size=3),
    "history": st.lists(st.builds(lambda key, value: {**EPOCH, key: value}, st.sampled_from(sorted(EPOCH)), json_values)
                        | json_values, min_size=1, max_size=2)})


@settings(PROPERTY, max_examples=40)   # an orbax restore per example (50 ms)
@given(data=damaged(json.dumps({**run_meta(7), "history": [EPOCH]}).encode()) | st.binary(max_size=100)
       | st.builds(lambda changes: json.dumps({**run_meta(7), **changes}).encode(), META_CHANGES))
def test_any_bytes_as_the_meta_item_give_a_run_or_one_line(saved_run, data):
    _restore_run_or_one_line_error(saved_run, data)


@settings(PROPERTY, max_examples=40)
@given(changes=META_CHANGES)
def test_any_json_values_in_the_meta_item_give_a_run_its_readers_use_or_one_line(saved_run, changes):
    _restore_run_or_one_line_error(saved_run, json.dumps({**run_meta(7), **changes}).encode())


def _restore_run_or_one_line_error(saved_run, data):
    workdir, meta_file = saved_run
    open(meta_file, "wb").write(data)
    restored = value_or_one_line_error(lambda: checkpoint.restore_run(workdir), checkpoint.checkpoint_dir(workdir))
    if restored is not None:   # what evaluate.py and a resumed `train.fit` compute from it: no other error
        _, _, meta = restored
        assert meta["step"] == 7
        divmod(meta["step"], meta["steps_per_epoch"])
        float(np.mean(np.asarray([*meta["epoch_losses"], 0.5], np.float64)))
        (meta["epoch_correct"] + 1) / meta["steps_per_epoch"]
        if meta["moving_loss"] is not None:
            0.99 * meta["moving_loss"] + 0.01 * 0.5
        [(record["step"] + 1, 100 * record["test_accuracy"], record["train_loss"] + 1) for record in meta["history"]]


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
    old_meta = {k: v for k, v in run_meta(12, steps_per_epoch=6).items() if k != "format"}
    write_old_format_checkpoint(workdir, 12, params, bare, old_meta)
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
    from cnn_jax import run
    from cnn_jax.rundir import report
    from cnn_jax.engine import train
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
    meta = {**checkpoint.checkpoint_meta(train.RunLog(step=10, moving_loss=history[0]["moving_loss"], history=history),
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
