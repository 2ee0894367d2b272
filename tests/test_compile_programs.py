"""experiments/compile_programs.py: the training program and the evaluation batch of a small config
are compiled (not loaded) and each gets its row of seconds; bad sizes are one line."""

import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "experiments", "compile_programs.py")


def test_the_training_program_and_evaluation_batch_are_compiled_and_timed():
    proc = subprocess.run([sys.executable, SCRIPT, "--train_images=128", "--test_images=64", "--batch_size=32",
                           "--eval_batch_size=32", "--nocompilation_cache"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ("run", "eval_batch")}
    assert set(rows) == {"run", "eval_batch"}
    for trace, lower, backend in rows.values():
        assert trace > 0 and lower > 0 and backend > 0
    assert re.search(r"^2 programs, 0 loaded from the persistent cache; .* compiling wall ", proc.stdout, re.M)


@pytest.mark.parametrize("args, fragment", [
    (["--train_images=0"], "--train_images=0 is not allowed: it must be positive"),
    (["--train_images=16"], "--batch_size=64 is larger than --train_images=16"),
])
def test_bad_sizes_are_one_line(args, fragment):
    proc = subprocess.run([sys.executable, SCRIPT, "--nocompilation_cache", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
