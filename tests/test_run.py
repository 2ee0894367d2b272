"""Runs kept in a workdir: files written, refusal, divergence, stop/resume equality (in-process and CLI).

The command-line tests run experiments/train.py as a subprocess on 2,048 real MNIST
training images (3 epochs of 64 steps at batch 32): one uninterrupted reference run, and
one run that is SIGKILLed during its second epoch, resumed, SIGTERMed in the middle of
its third epoch, and resumed again; both must end with bit-identical parameters.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax import run
from cnn_jax.config import Config, ConfigError
from cnn_jax.engine import train
from cnn_jax.rundir import checkpoint, lock, report
from cnn_jax.rundir import workdir as workdir_lib
import script_runner
from conftest import REPO_ROOT

TRAIN_SCRIPT = os.path.join(REPO_ROOT, "experiments", "train.py")
STEPS_PER_EPOCH = 64


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ---------------------------------------------------------------- in-process


@pytest.fixture(scope="module")
def tiny(mnist):
    """640 real training images (10 steps of 64) and 200 real test images."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:640], train_labels=mnist.train_labels[:640],
                               test_images=mnist.test_images[:200], test_labels=mnist.test_labels[:200])


TINY = config_lib.replace(Config(), epochs=2, log_every=3, loop="step", train_eval="running")


def test_nothing_is_written_without_a_workdir(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    history = run.train_and_evaluate(config_lib.replace(TINY, epochs=1), dataset=tiny)
    assert len(history) == 1 and os.listdir(tmp_path) == []


def test_workdir_holds_config_metrics_checkpoints_results_plots(tiny, tmp_path):
    workdir = str(tmp_path / "run")
    history = run.train_and_evaluate(TINY, workdir, dataset=tiny, tensorboard=True)
    assert workdir_lib.read_config(workdir) == TINY
    records = workdir_lib.read_metrics(workdir)
    train_records = [r for r in records if r["kind"] == "train"]
    epoch_records = [r for r in records if r["kind"] == "epoch"]
    assert [r["step"] for r in train_records] == [3, 6, 9, 12, 15, 18]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 and r["images_per_second"] > 0 for r in train_records)
    assert [r["step"] for r in epoch_records] == [10, 20]
    for record, kept in zip(history, epoch_records):
        assert {k: kept[k] for k in record} == record
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
    results = json.load(open(os.path.join(workdir, "results.json")))
    assert results["test_accuracy"] == history[-1]["test_accuracy"]
    assert np.sum(results["confusion_matrix"]) == 200 and len(results["per_class_accuracy"]) == 10
    assert sorted(os.listdir(os.path.join(workdir, "plots"))) == sorted(
        ["learning_curves.png", "conv1_filters.png", "confusion_matrix.png", "misclassified.png"])
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    assert os.path.getsize(os.path.join(workdir, "tensorboard", events[0])) > 200
    assert not [n for n in os.listdir(workdir) if ".tmp" in n]


def read_scalars(folder):
    """{tag: [(step, value)]} from the TFRecord event files in `folder` (what TensorBoard reads)."""
    import struct
    from tensorboardX.proto.event_pb2 import Event
    scalars = {}
    for name in sorted(os.listdir(folder)):
        raw = open(os.path.join(folder, name), "rb").read()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            event = Event.FromString(raw[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_event_file_holds_the_scalars(tiny, tmp_path):
    workdir = str(tmp_path / "run")
    history = run.train_and_evaluate(config_lib.replace(TINY, epochs=1), workdir, dataset=tiny, tensorboard=True)
    scalars = read_scalars(os.path.join(workdir, "tensorboard"))
    assert [step for step, _ in scalars["epoch/test_accuracy"]] == [10]
    assert scalars["epoch/test_accuracy"][0][1] == pytest.approx(history[0]["test_accuracy"])
    assert [step for step, _ in scalars["train/loss"]] == [3, 6, 9]


def test_a_mid_epoch_stop_resumes_to_identical_params(tiny):
    saved = []

    def on_stop(state, log):
        saved.append((jax.device_get(state), dataclasses.replace(log, epoch_losses=list(log.epoch_losses))))

    whole, whole_history = train.fit(TINY, tiny)
    with pytest.raises(train.Stopped) as stopped:
        train.fit(TINY, tiny, hooks=train.Hooks(should_stop=lambda step: step == 14, on_stop=on_stop))
    state, log = saved[0]
    assert stopped.value.step == 14 and log.step == int(state.step) == 14 and len(log.epoch_losses) == 4
    final, history = train.fit(TINY, tiny, start=saved[0])
    assert leaves_equal(final, whole)
    assert [h["moving_loss"] for h in history] == [h["moving_loss"] for h in whole_history]
    assert [h["train_accuracy"] for h in history] == [h["train_accuracy"] for h in whole_history]
    assert [h["test_accuracy"] for h in history] == [h["test_accuracy"] for h in whole_history]


def test_checkpoint_meta_round_trips_a_mid_epoch_state(tiny, tmp_path):
    """What the SIGTERM hook saves restores to a state that finishes like an uninterrupted run."""
    workdir = str(tmp_path / "run")
    whole, _ = train.fit(TINY, tiny)
    manager = checkpoint.open_manager(workdir)

    def on_stop(state, log):
        checkpoint.save(manager, state, checkpoint.checkpoint_meta(log, TINY, 10))

    with pytest.raises(train.Stopped):
        train.fit(TINY, tiny, hooks=train.Hooks(should_stop=lambda step: step == 7, on_stop=on_stop))
    manager.close()
    start = checkpoint.restore_state(workdir, checkpoint.fresh_state(TINY), 10)
    assert start[1].step == int(start[0].step) == 7 and len(start[1].epoch_losses) == 7
    final, _ = train.fit(TINY, tiny, start=start)
    assert leaves_equal(final, whole)
    with pytest.raises(ConfigError, match="steps per epoch"):
        checkpoint.restore_state(workdir, checkpoint.fresh_state(TINY), 20)


def test_a_foreign_workdir_is_refused_and_left_untouched(tiny, tmp_path):
    workdir = str(tmp_path / "run")
    run.train_and_evaluate(config_lib.replace(TINY, epochs=1), workdir, dataset=tiny)
    before = {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)}
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        run.train_and_evaluate(config_lib.replace(TINY, pool="avg"), workdir, dataset=tiny)
    with pytest.raises(ConfigError, match="--pool=avg"):
        run.train_and_evaluate(config_lib.replace(TINY, pool="avg"), workdir, dataset=tiny, resume=True)
    assert {name: os.path.getmtime(os.path.join(workdir, name)) for name in os.listdir(workdir)} == before
    open(os.path.join(workdir, "results.json"), "w").write("{}")
    history = run.train_and_evaluate(config_lib.replace(TINY, epochs=1), workdir, dataset=tiny, overwrite=True)
    assert len(history) == 1 and len(workdir_lib.read_metrics(workdir)) == 4   # a fresh run's records only
    assert json.load(open(os.path.join(workdir, "results.json")))["test_accuracy"] == history[0]["test_accuracy"]


def test_resume_extends_a_finished_run_and_keeps_its_history(tiny, tmp_path):
    workdir = str(tmp_path / "run")
    first = run.train_and_evaluate(config_lib.replace(TINY, epochs=1), workdir, dataset=tiny)
    both = run.train_and_evaluate(TINY, workdir, dataset=tiny, resume=True)
    whole = train.fit(TINY, tiny)[1]
    assert both[0] == first[0] and len(both) == 2
    assert [h["test_accuracy"] for h in both] == [h["test_accuracy"] for h in whole]
    assert [r["step"] for r in workdir_lib.read_metrics(workdir) if r["kind"] == "epoch"] == [10, 20]


def test_a_run_written_with_the_old_names_evaluates_and_resumes(tiny, tmp_path):
    """A run of the tutorial's recipe whose config.json holds the names used before the renames
    (init "seed", optimizer "seed_sgd"): migrated on read, it evaluates to the accuracy training
    printed and resumes to the params of an uninterrupted run."""
    tutorial = config_lib.replace(config_lib.PRESETS["tutorial"], epochs=2, log_every=3, loop="step",
                                  train_eval="running")
    workdir = str(tmp_path / "run")
    first = run.train_and_evaluate(config_lib.replace(tutorial, epochs=1), workdir, dataset=tiny)
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    values = json.load(open(path))
    json.dump({**values, "init": "seed", "optimizer": "seed_sgd"}, open(path, "w"))
    config, state, meta = checkpoint.restore_run(workdir)
    assert (config.init, config.optimizer) == ("normal", "sgd")
    evaluated = report.evaluate_test(state.params, state.model_state, tiny, config)
    assert evaluated["accuracy"] == first[0]["test_accuracy"] == meta["history"][-1]["test_accuracy"]
    run.train_and_evaluate(tutorial, workdir, dataset=tiny, resume=True)
    assert leaves_equal(checkpoint.restore(workdir, tutorial)[0].params, train.fit(tutorial, tiny)[0].params)


def test_bad_data_writes_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    config = config_lib.replace(TINY, data_dir=str(tmp_path / "missing"))
    from cnn_jax.data.sources import DataError
    with pytest.raises(DataError):
        run.train_and_evaluate(config, workdir)
    assert not os.path.exists(workdir)


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    workdir = str(tmp_path / "run")
    run.train_and_evaluate(config_lib.replace(TINY, epochs=1), workdir, dataset=tiny)
    good = checkpoint.restore(workdir, TINY)[0]
    poisoned = dataclasses.replace(tiny, train_images=np.full_like(tiny.train_images, np.nan))
    with pytest.raises(FloatingPointError, match=r"became (nan|non-finite) at step 11 \(epoch 1\).*"
                                                 r"last good checkpoint \(step 10\) is kept"):
        run.train_and_evaluate(TINY, workdir, dataset=poisoned, resume=True)
    assert checkpoint.latest_step(workdir) == 10
    assert leaves_equal(checkpoint.restore(workdir, TINY)[0], good)
    assert checkpoint.all_finite(good)


# ---------------------------------------------------------------- command line


def cli_args(mnist_dir, workdir, *extra):
    return [sys.executable, TRAIN_SCRIPT, f"--data_dir={mnist_dir}", "--train_subset=2048", "--test_subset=512",
            "--epochs=3", "--batch_size=32", "--log_every=2", "--loop=step", "--train_eval=running",
            "--eval_batch_size=512", f"--workdir={workdir}", *extra]


def run_cli(args, **kwargs):
    return script_runner.run(args, timeout=300, **kwargs)


def run_until(args, marker, sig):
    """Start `args`, send `sig` on the first stdout line containing `marker`; return (rc, stdout, stderr)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + out, err


@pytest.fixture(scope="module")
def reference_run(mnist_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cli") / "reference")
    result = run_cli(cli_args(mnist_dir, workdir))
    assert result.returncode == 0, result.stderr
    return workdir, result.stdout


@pytest.mark.slow
def test_cli_run_killed_in_epoch_2_and_terminated_in_epoch_3_resumes_bit_identical(mnist_dir, reference_run,
                                                                                    tmp_path):
    reference, _ = reference_run
    workdir = str(tmp_path / "interrupted")
    # SIGKILL during the second epoch (epoch 1): only the first epoch's checkpoint survives.
    rc, out, _ = run_until(cli_args(mnist_dir, workdir), "(epoch 1, 2/64)", signal.SIGKILL)
    assert rc == -signal.SIGKILL and "Epoch 1." not in out
    assert checkpoint.latest_step(workdir) == STEPS_PER_EPOCH
    # Resume; SIGTERM in the middle of the third epoch saves a mid-epoch checkpoint.
    rc, out, err = run_until(cli_args(mnist_dir, workdir, "--resume"), "(epoch 2, 2/64)", signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    assert "resuming" in out and "at step 64" in out and "Epoch 1." in out
    assert "interrupted by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    stopped = checkpoint.latest_step(workdir)
    assert 2 * STEPS_PER_EPOCH < stopped < 3 * STEPS_PER_EPOCH
    # Resume again to the end.
    result = run_cli(cli_args(mnist_dir, workdir, "--resume"))
    assert result.returncode == 0, result.stderr
    assert f"at step {stopped}" in result.stdout and "Epoch 2." in result.stdout

    config = workdir_lib.read_config(reference)
    state, meta = checkpoint.restore(reference, config)
    resumed, resumed_meta = checkpoint.restore(workdir, config)
    assert meta["step"] == resumed_meta["step"] == 3 * STEPS_PER_EPOCH
    assert leaves_equal(state, resumed)
    assert meta["moving_loss"] == resumed_meta["moving_loss"]
    strip = ("epoch_time", "images_per_second")
    assert ([{k: v for k, v in h.items() if k not in strip} for h in meta["history"]]
            == [{k: v for k, v in h.items() if k not in strip} for h in resumed_meta["history"]])
    # metrics.jsonl: the same records, once each (the killed attempt's extra ones were dropped).
    kept = [{k: v for k, v in r.items() if k not in strip} for r in workdir_lib.read_metrics(workdir)]
    expected = [{k: v for k, v in r.items() if k not in strip} for r in workdir_lib.read_metrics(reference)]
    assert kept == expected and len(expected) == 3 * 32 + 3
    results = [json.load(open(os.path.join(d, "results.json"))) for d in (reference, workdir)]
    assert results[0] == results[1]


def test_cli_refuses_a_foreign_workdir_in_one_line(mnist_dir, reference_run):
    reference, _ = reference_run
    before = open(os.path.join(reference, "config.json")).read()
    result = run_cli(cli_args(mnist_dir, reference, "--pool=avg"))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "already holds a run" in result.stderr
    result = run_cli(cli_args(mnist_dir, reference, "--pool=avg", "--resume"))
    assert result.returncode == 2 and "--pool=avg" in result.stderr and "Traceback" not in result.stderr
    assert open(os.path.join(reference, "config.json")).read() == before


def test_cli_divergence_is_one_line_naming_the_step(mnist_dir, tmp_path):
    workdir = str(tmp_path / "diverge")
    result = run_cli(cli_args(mnist_dir, workdir, "--optimizer=sgd", "--learning_rate=1e30", "--epochs=1",
                              "--train_subset=256"))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "at step" in line and "--learning_rate" in line and "no checkpoint was written" in line
    assert checkpoint.latest_step(workdir) is None
    assert workdir_lib.read_config(workdir).learning_rate == 1e30


def damaged_idx_dir(mnist_dir, folder, damage):
    """A copy of the MNIST IDX folder with one file damaged: truncated gzip or labels out of range."""
    import gzip
    import shutil
    os.makedirs(folder)
    for name in os.listdir(mnist_dir):
        if name.endswith(".gz"):
            shutil.copy(os.path.join(mnist_dir, name), folder)
    if damage == "truncated":
        path = os.path.join(folder, "train-images-idx3-ubyte.gz")
        open(path, "r+b").truncate(5000)
    else:
        with gzip.open(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(b"\x00\x00\x08\x01" + (10000).to_bytes(4, "big") + bytes([12]) * 10000)
    return folder


def snapshot(folder):
    """{relative path: (size, mtime_ns, bytes)} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            stat = os.stat(path)
            out[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns, open(path, "rb").read())
    return out


def one_line_error(result, fragment):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert fragment in result.stderr, result.stderr


def test_cli_damaged_data_writes_nothing_to_a_new_workdir(mnist_dir, tmp_path):
    bad = damaged_idx_dir(mnist_dir, str(tmp_path / "mnist"), "truncated")
    workdir = tmp_path / "run"
    result = run_cli(cli_args(bad, str(workdir)))
    one_line_error(result, f"{bad}/train-images-idx3-ubyte.gz: corrupt or truncated gzip")
    assert result.stdout == "" and not workdir.exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cli_resume_refused_for_bad_data_metrics_or_checkpoint_leaves_the_run_byte_identical(
        mnist_dir, reference_run, tmp_path):
    import shutil
    reference, _ = reference_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    bad = damaged_idx_dir(mnist_dir, str(tmp_path / "mnist"), "labels")
    before = snapshot(workdir)
    result = run_cli(cli_args(bad, workdir, "--resume", "--epochs=4"))
    one_line_error(result, "test labels range 12..12, outside the 10 classes of mnist")
    assert snapshot(workdir) == before

    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"kind": "tra\n')
    before = snapshot(workdir)
    result = run_cli(cli_args(mnist_dir, workdir, "--resume", "--epochs=4"))
    one_line_error(result, "metrics.jsonl: line 100: not valid JSON")
    assert snapshot(workdir) == before

    shutil.rmtree(workdir)
    shutil.copytree(reference, workdir)
    from test_checkpoint import damage
    damage(workdir, 3 * STEPS_PER_EPOCH)
    before = snapshot(workdir)
    result = run_cli(cli_args(mnist_dir, workdir, "--resume", "--epochs=4"))
    one_line_error(result, f"checkpoints/{3 * STEPS_PER_EPOCH}: cannot restore")
    assert f"other checkpoints here: {STEPS_PER_EPOCH}, {2 * STEPS_PER_EPOCH}" in result.stderr
    assert snapshot(workdir) == before


# Runs experiments/train.py with every training image NaN (real data otherwise): a run that diverges
# at the first step it takes, wherever it starts.
NAN_IMAGES = """
import dataclasses, runpy, sys
import numpy as np
from cnn_jax.data import sources as data
load = data.load
data.load = lambda config: (lambda d: dataclasses.replace(d, train_images=np.full_like(d.train_images, np.nan)))(load(config))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cli_divergence_on_resume_keeps_the_last_good_checkpoint(mnist_dir, reference_run, tmp_path):
    import shutil
    reference, _ = reference_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    before = snapshot(checkpoints)
    result = run_cli([sys.executable, "-c", NAN_IMAGES, *cli_args(mnist_dir, workdir, "--resume", "--epochs=4")[1:]])
    last = 3 * STEPS_PER_EPOCH
    one_line_error(result, f"non-finite at step {last + 1} (epoch 3); lower --learning_rate; "
                           f"the last good checkpoint (step {last}) is kept")
    assert snapshot(checkpoints) == before and checkpoint.latest_step(workdir) == last


def test_cli_sigint_saves_a_mid_epoch_checkpoint(mnist_dir, tmp_path):
    workdir = str(tmp_path / "run")
    rc, out, err = run_until(cli_args(mnist_dir, workdir, "--epochs=1"), "(epoch 0, 2/64)", signal.SIGINT)
    assert rc == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "Epoch 0." not in out
    assert err.strip().splitlines()[-1].startswith("interrupted by SIGINT: checkpoint of step ")
    stopped = checkpoint.latest_step(workdir)
    assert 0 < stopped < STEPS_PER_EPOCH and f"checkpoint of step {stopped} saved" in err
    assert checkpoint.restore(workdir, workdir_lib.read_config(workdir))[1]["step"] == stopped


@pytest.mark.parametrize("damaged_file, damage, fragment", [
    ("config.json", lambda good: good.replace(b'"pool": "max"', b'"pool": "m\xe4x"'),
     "config.json: not UTF-8 text (byte 0xe4 at offset"),
    ("metrics.jsonl", lambda good: b"\xff" + good, "metrics.jsonl: not UTF-8 text (byte 0xff at offset 0)"),
], ids=["config_latin1", "metrics_latin1"])
def test_cli_resume_of_a_run_with_an_undecodable_file_is_one_line_and_changes_nothing(
        mnist_dir, reference_run, tmp_path, damaged_file, damage, fragment):
    import shutil
    reference, _ = reference_run
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    path = os.path.join(workdir, damaged_file)
    good = open(path, "rb").read()
    open(path, "wb").write(damage(good))
    before = snapshot(workdir)
    result = run_cli(cli_args(mnist_dir, workdir, "--resume", "--epochs=4"))
    one_line_error(result, fragment)
    assert snapshot(workdir) == before


# ---------------------------------------------------------------- one writer; failed writes (command line)


def small_args(mnist_dir, workdir, *extra):
    """A quick run: 10 steps of 64 per epoch, 2 epochs, checkpoints 10 and 20 (about 1.5 MB each)."""
    return [sys.executable, TRAIN_SCRIPT, f"--data_dir={mnist_dir}", "--train_subset=640", "--test_subset=200",
            "--epochs=2", "--train_eval=running", f"--workdir={workdir}", *extra]


def slow_args(mnist_dir, workdir, *extra):
    """Epochs of 128 steps of 32, one call per step: long enough to stop the process in the middle."""
    return [sys.executable, TRAIN_SCRIPT, f"--data_dir={mnist_dir}", "--train_subset=4096", "--test_subset=200",
            "--epochs=2", "--batch_size=32", "--log_every=2", "--loop=step", "--train_eval=running",
            f"--workdir={workdir}", *extra]


def stopped_at(args, marker):
    """Start `args` and SIGSTOP it on the first stdout line containing `marker`; return the process."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    for line in proc.stdout:
        if marker in line:
            proc.send_signal(signal.SIGSTOP)
            return proc
    raise AssertionError(f"{marker!r} never printed: {proc.communicate()[1]}")


def finish(proc):
    """SIGCONT a stopped process and wait for it; (exit status, stderr)."""
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def test_cli_a_second_writer_is_refused_in_one_line_and_a_killed_holder_blocks_nothing(mnist_dir, tmp_path):
    workdir = str(tmp_path / "run")
    holder = stopped_at(slow_args(mnist_dir, workdir, "--epochs=1"), "(epoch 0, 2/128)")
    try:
        before = snapshot(workdir)
        in_use = f"error: {workdir} is in use by process {holder.pid} ("
        # A second --resume (the same command, --overwrite: the same path through the lock), plot.py.
        for args in (slow_args(mnist_dir, workdir, "--resume"),
                     [sys.executable, os.path.join(REPO_ROOT, "experiments", "plot.py"), f"--workdir={workdir}"]):
            result = run_cli(args)
            one_line_error(result, in_use)
            assert "experiments/train.py" in result.stderr and "wait for it to finish or use another --workdir" \
                in result.stderr
            assert snapshot(workdir) == before
    finally:
        holder.kill()   # SIGKILL, while stopped: the lock dies with it
        holder.communicate()
    assert os.path.exists(os.path.join(workdir, lock.LOCK_FILE))
    result = run_cli(slow_args(mnist_dir, workdir, "--resume", "--epochs=1"))   # the holder's compiled programs
    assert result.returncode == 0, result.stderr
    assert checkpoint.latest_step(workdir) == 128 and not os.path.exists(os.path.join(workdir, lock.LOCK_FILE))


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MiB tmpfs: room for one checkpoint of `small_args` but not two. Needs root (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def remount(folder, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def assert_restores(workdir, step):
    assert checkpoint.latest_step(workdir) == step
    _, meta = checkpoint.restore(workdir, workdir_lib.read_config(workdir))
    assert meta["step"] == step


def test_cli_full_disk_while_checkpointing_is_one_line_and_resume_goes_on(mnist_dir, small_filesystem):
    workdir = str(small_filesystem / "run")
    result = run_cli(small_args(mnist_dir, workdir))
    one_line_error(result, f"error: cannot write checkpoint 20 in {workdir}/checkpoints (No space left on device); "
                           "the last complete checkpoint (step 10) is kept: free some space")
    assert "--resume" in result.stderr
    assert_restores(workdir, 10)
    # What a failed write can leave (here removed already; a killed writer leaves them): the next start clears them.
    os.makedirs(os.path.join(workdir, "checkpoints", "20.orbax-checkpoint-tmp", "state"))
    open(os.path.join(workdir, ".metrics.jsonl.tmp-99999"), "w").write('{"kind": ')
    remount(small_filesystem, "size=8m")
    result = run_cli(small_args(mnist_dir, workdir, "--resume"))
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout and "at step 10" in result.stdout
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
    assert not [n for n in os.listdir(workdir) if ".tmp" in n]
    assert_restores(workdir, 20)
    assert [r["step"] for r in workdir_lib.read_metrics(workdir) if r["kind"] == "epoch"] == [10, 20]


def test_cli_read_only_run_directory_is_one_line_and_keeps_the_last_checkpoint(mnist_dir, small_filesystem):
    remount(small_filesystem, "size=16m")
    workdir = str(small_filesystem / "run")
    proc = stopped_at(slow_args(mnist_dir, workdir), "(epoch 1, 2/128)")
    remount(small_filesystem, "ro")
    rc, err = finish(proc)
    assert rc == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.startswith(f"error: cannot write {workdir}/metrics.jsonl (Read-only file system); "
                          "the last complete checkpoint (step 128) is kept"), err
    assert_restores(workdir, 128)
    before = snapshot(workdir)
    result = run_cli(slow_args(mnist_dir, workdir, "--resume"))     # still read-only: refused, nothing written
    one_line_error(result, f"error: cannot write {workdir}/config.json (Read-only file system); "
                           "the last complete checkpoint (step 128) is kept")
    assert snapshot(workdir) == before


def test_cli_a_run_directory_deleted_while_training_is_one_line_and_not_recreated(mnist_dir, tmp_path):
    workdir = str(tmp_path / "run")
    proc = stopped_at(slow_args(mnist_dir, workdir), "(epoch 1, 2/128)")
    import shutil
    shutil.rmtree(workdir)
    rc, err = finish(proc)
    assert rc == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert err.strip() == (f"error: cannot write {workdir}/metrics.jsonl (No such file or directory); "
                           f"{workdir} no longer exists, so nothing of the run is kept")
    assert not os.path.exists(workdir)
