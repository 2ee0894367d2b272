"""The command line end to end: experiments/train.py on a small real subset, and bad flags."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

TRAIN = os.path.join(REPO_ROOT, "experiments", "train.py")


def run(*args, timeout=300):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT)


def test_train_script_on_a_real_subset(mnist_dir):
    result = run(f"--data_dir={mnist_dir}", "--train_subset=1280", "--test_subset=500", "--pool=max",
                 "--epochs=2", "--debug")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "flatten  800" in lines
    epochs = [line for line in lines if line.startswith("Epoch ")]
    assert len(epochs) == 2
    pattern = r"Epoch (\d)\. Loss: [\d.]+, Train_acc ([\d.]+), Test_acc ([\d.]+), [\d.]+ s, \d+ img/s"
    last = re.fullmatch(pattern, epochs[-1])
    assert last, epochs[-1]
    assert float(last.group(3)) > 0.7


def test_seed_preset_runs_from_the_command_line(mnist_dir):
    result = run("--preset=seed", f"--data_dir={mnist_dir}", "--train_subset=640", "--test_subset=200")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^Epoch 0\. Loss: ", result.stdout, re.M)


@pytest.mark.parametrize("args,fragment", [
    (["--pool=min"], "--pool='min' is not allowed: use one of max, avg"),
    (["--batch_size=0"], "--batch_size=0 is not allowed"),
    (["--learning_rate=-1"], "--learning_rate=-1.0 is not allowed"),
    (["--conv_filters=20,x"], "--conv_filters=20,x is not allowed"),
    (["--conv_kernels=3,30"], "conv2 kernel 30 is larger than its 13x13 input"),
    (["--conv_filters=8,8,8", "--conv_kernels=5,5,4"], "so the flattened size would be zero"),
    (["--conv_filters=20"], "--conv_filters=20 and --conv_kernels=3,5 differ in length"),
    (["--preset=tutorial"], "--preset"),
    (["--resume"], "--resume, --overwrite and --tensorboard need --workdir"),
    (["--optimizer=rmsprop"], "--optimizer='rmsprop'"),
    (["--dataset=cifar"], "--dataset='cifar'"),
    (["--data_dir=/nonexistent/mnist"], "--data_dir=/nonexistent/mnist: no such directory"),
    (["--epochs=abc"], "--epochs"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["positional"], "unexpected arguments positional"),
])
def test_bad_input_gets_one_clear_line(args, fragment):
    result = run(*args, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [next(line for line in result.stderr.splitlines()
                                                       if fragment in line)]


# Runs experiments/train.py as `python train.py ...` does, with every network connection refused.
OFFLINE = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network is unreachable")
socket.create_connection = refuse
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_no_data_source_offline_is_one_line_and_writes_nothing(tmp_path):
    """No --data_dir, no TFDS copy, no network: one line naming --data_dir, no workdir created."""
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", OFFLINE, TRAIN, f"--workdir={workdir}", "--train_subset=256"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                            env={**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds")})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: TensorFlow Datasets has no copy of 'mnist' and storage.googleapis.com cannot be reached "
        "(offline?); pass --data_dir with the four IDX files (on this project's machines: "
        "--data_dir=../shared/data/mnist)"]
    assert not workdir.exists()


def test_a_batch_larger_than_the_data_is_refused_before_writing(mnist_dir, tmp_path):
    workdir = tmp_path / "run"
    result = run(f"--data_dir={mnist_dir}", "--train_subset=16", f"--workdir={workdir}", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: --batch_size=64 is larger than the 16 training images"]
    assert not workdir.exists()


def test_quiet_background_reports_drops_only_the_closed_loop_echoes(monkeypatch):
    """Orbax's abandoned reads and writes report `RuntimeError('Event loop is closed')` through
    sys.unraisablehook, or tensorstore's PyErr_Print through sys.excepthook, and orbax's worker
    threads log the error their waiter raises again; only those are dropped."""
    import logging
    import types

    from cnn_jax import cli

    reported, excepted = [], []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, tb: excepted.append(error))
    absl_logger = logging.getLogger("absl")
    monkeypatch.setattr(absl_logger, "filters", [])
    cli.quiet_background_reports()
    cli.quiet_background_reports()   # a second call adds nothing
    assert len(absl_logger.filters) == 1
    echo = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
    sys.unraisablehook(echo)
    sys.unraisablehook(other)
    assert reported == [other]
    for error in (echo.exc_value, other.exc_value):
        sys.excepthook(RuntimeError, error, None)
    assert excepted == [other.exc_value]

    def record(pathname, level, message):
        return logging.LogRecord("absl", level, pathname, 387, message, None, None)

    future = "/site-packages/orbax/checkpoint/_src/futures/future.py"
    assert not absl_logger.filter(record(future, logging.ERROR, "_SignalingThread.run() raised an exception: X"))
    assert absl_logger.filter(record(future, logging.WARNING, "_SignalingThread.run() raised an exception: X"))
    assert absl_logger.filter(record("/site-packages/other/module.py", logging.ERROR, "raised an exception"))
    assert absl_logger.filter(record(future, logging.ERROR, "something else failed"))
