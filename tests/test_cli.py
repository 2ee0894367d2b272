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
    (["--optimizer=rmsprop"], "--optimizer='rmsprop'"),
    (["--dataset=cifar"], "--dataset='cifar'"),
    (["--data_dir=/nonexistent/mnist"], "--data_dir=/nonexistent/mnist: no such directory"),
    (["--epochs=abc"], "--epochs"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["positional"], "unexpected arguments positional"),
])
def test_bad_input_gets_one_clear_line(args, fragment):
    result = run(*args, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if fragment in line]
    assert len(error_lines) == 1
