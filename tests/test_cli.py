"""The command line end to end: experiments/train.py on a small real subset, and bad flags."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

import script_runner
from cnn_jax import config as config_lib
from cnn_jax import models
from conftest import REPO_ROOT

TRAIN = os.path.join(REPO_ROOT, "experiments", "train.py")


def run(*args, timeout=300):
    return script_runner.run([sys.executable, TRAIN, *args], timeout=timeout)


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


def test_tutorial_preset_runs_from_the_command_line(mnist_dir):
    result = run("--preset=tutorial", f"--data_dir={mnist_dir}", "--train_subset=640", "--test_subset=200")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^Epoch 0\. Loss: ", result.stdout, re.M)


def test_helpshort_lists_every_flag_the_script_takes_grouped():
    result = run("--helpshort", timeout=120)
    heading = re.compile(r"^(\S.*):$")
    groups, current = {}, None
    for line in result.stdout.splitlines():
        if heading.match(line):
            current = heading.match(line).group(1)
        elif current and line.startswith("  --"):
            groups.setdefault(current, []).append(re.match(r"  --(?:\[no\])?(\w+)", line).group(1))
    assert next(iter(groups)) == TRAIN   # the script's own flags first, under its path (absl's heading)
    assert groups.pop(TRAIN) == ["overwrite", "resume", "seeds", "tensorboard", "workdir"]   # seeds: --seeds=0-9
    assert {group: sorted(names) for group, names in groups.items()} == \
        {group: sorted(names) for group, names in config_lib.FLAG_GROUPS.items()}
    assert list(groups) == list(config_lib.FLAG_GROUPS)
    text = "".join(result.stdout.split())   # absl wraps the help texts, at hyphens too
    for field in dataclasses.fields(config_lib.Config):   # each as the field declares it
        help_text = field.metadata["help"].format(names=config_lib.one_of(models.names()))
        assert "".join(help_text.split()) in text, field.name
    assert "Modelfamily(cnn_jax.models):cnn,vggorresnet." in text
    assert "logtostderr" not in result.stdout and "--helpfull" in result.stdout
    full = run("--helpfull", timeout=120).stdout
    assert "logtostderr" in full and all(f"\n{group}:\n" in full for group in config_lib.FLAG_GROUPS)


@pytest.mark.parametrize("args,fragment", [
    (["--pool=min"], "--pool='min' is not allowed: use one of max, avg"),
    (["--batch_size=0"], "--batch_size=0 is not allowed"),
    (["--learning_rate=-1"], "--learning_rate=-1.0 is not allowed"),
    (["--conv_filters=20,x"], "--conv_filters=20,x is not allowed"),
    (["--conv_kernels=3,30"], "conv2 kernel 30 is larger than its 13x13 input"),
    (["--conv_filters=8,8,8", "--conv_kernels=5,5,4"], "so the flattened size would be zero"),
    (["--conv_filters=20"], "--conv_filters=20 and --conv_kernels=3,5 differ in length"),
    (["--preset=nope"], "--preset"),
    (["--preset=seed"], "--preset=seed was renamed: use --preset=tutorial"),
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


# Runs experiments/train.py as `python train.py ...` does, with every network connection refused
# and the project machines' shared data folder pointed elsewhere (argv[1]).
OFFLINE = """
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network is unreachable")
socket.create_connection = refuse
import cnn_jax.data.sources
cnn_jax.data.sources.SHARED_DATA_DIR = sys.argv.pop(1)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def clean_env(tmp_path):
    """The environment without any data source: no CNN_JAX_* folder variables, an empty TFDS dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_JAX_")}
    return {**env, "TFDS_DATA_DIR": str(tmp_path / "tfds"), "PYTHONPATH": REPO_ROOT}


def test_no_data_flag_trains_on_the_shared_copy_from_any_directory(tmp_path, mnist_dir):
    """The main job needs no data flag: the shared copy (here a stand-in folder holding the tests'
    MNIST, the shared data folder pointed at it, the network refused) is found whatever the current
    directory, and the source is named in one line."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "mnist").symlink_to(os.path.abspath(mnist_dir), target_is_directory=True)
    result = subprocess.run([sys.executable, "-c", OFFLINE, str(shared), TRAIN, "--pool=max", "--train_subset=640",
                             "--test_subset=200"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=clean_env(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"data: mnist from {shared / 'mnist'} (the project machines' shared copy beside the repository)"
    assert re.search(r"^Epoch 0\. Loss: ", result.stdout, re.M)


def test_no_data_source_offline_is_one_line_and_writes_nothing(tmp_path):
    """No --data_dir, no copy anywhere, no network: one line saying what to do, no workdir created."""
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", OFFLINE, str(tmp_path / "no_shared"), TRAIN,
                             f"--workdir={workdir}", "--train_subset=256"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=clean_env(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no copy of mnist found (looked in $CNN_JAX_MNIST_DIR, "
                                                   "$CNN_JAX_DATA_DIR/mnist, "), lines
    assert lines[0].endswith("cannot be reached (offline?); pass --data_dir=FOLDER holding the four IDX files "
                             "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                             "t10k-labels-idx1-ubyte.gz (.gz or raw), or set $CNN_JAX_MNIST_DIR=FOLDER"), lines
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


def test_cifar10_trains_through_the_command_line_on_a_synthetic_folder(tmp_path):
    """CIFAR-10 shapes (32x32x3, from the registry) flow through the tutorial network: a few steps."""
    from test_dataset_files import write_cifar10
    write_cifar10(tmp_path / "cifar-10-batches-py", "py", sizes=(16, 16, 16, 16, 16, 20))
    result = run("--dataset=cifar10", f"--data_dir={tmp_path}", "--batch_size=16", "--pool=max", "--debug")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"data: cifar10 from {tmp_path} (--data_dir)"
    assert "flatten  1250" in result.stdout.splitlines()   # 32 -> 30 -> 15 -> 11 -> 5: 5 * 5 * 50
    assert re.search(r"^Epoch 0\. Loss: [\d.]+, Train_acc [\d.]+, Test_acc [\d.]+", result.stdout, re.M)
    contradiction = run("--dataset=cifar10", f"--data_dir={tmp_path}", "--num_classes=100")
    assert contradiction.returncode == 2 and contradiction.stderr.strip().splitlines() == [
        "error: cifar10 has 10 classes but --num_classes is 100; drop --num_classes (it follows --dataset) "
        "or set --num_classes=10"]
