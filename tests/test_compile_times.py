"""experiments/compile_times.py: a script run under it gets a table of the programs it compiled,
named, with each stage's seconds, and a second process counts its persistent-cache loads."""

import os
import re
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys
import jax, jax.numpy as jnp
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
def double_then_sum(x):
    return jnp.sum(2.0 * x)
print("result", float(jax.jit(double_then_sum)(jnp.arange(4.0))))
"""


def _run(script, cache):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "compile_times.py"), str(script),
                           str(cache)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_the_scripts_programs_are_listed_and_a_second_process_loads_them(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(SCRIPT)
    first = _run(script, tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    assert "result 12.0" in first.stdout
    row = next(line for line in first.stdout.splitlines() if line.startswith("double_then_sum"))
    trace, lower, backend = (float(v) for v in row.split()[1:])
    assert trace > 0 and lower > 0 and backend > 0   # seconds, printed to the millisecond
    assert "0 loaded from the persistent cache" in first.stdout
    second = _run(script, tmp_path / "cache")
    assert second.returncode == 0, second.stderr
    programs, loaded = (int(v) for v in re.search(r"(\d+) programs, (\d+) loaded from the persistent cache",
                                                   second.stdout).groups())
    assert programs >= 1 and loaded == programs   # every program of the second process came from the cache


@pytest.mark.parametrize("args", [[], ["--pool=max"]])
def test_no_script_is_one_line_and_status_2(args):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "compile_times.py"), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: give the script to run first, then its flags, e.g. "
        "python experiments/compile_times.py experiments/train.py --pool=max"]


def test_helpshort_prints_the_usage_and_runs_nothing():
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "compile_times.py"),
                           "--helpshort"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    assert "python experiments/compile_times.py experiments/train.py --pool=max" in proc.stdout
