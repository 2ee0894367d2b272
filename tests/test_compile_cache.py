"""The persistent compilation cache: a second process loads what the first compiled."""

import os
import re
import subprocess
import sys

import pytest
import script_runner
from conftest import REPO_ROOT

from cnn_jax import compile_cache

TRAIN = os.path.join(REPO_ROOT, "experiments", "train.py")


def test_default_dir_follows_jax_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.default_dir() == str(tmp_path / "jax")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_dir() == str(tmp_path / "xdg" / "cnn_jax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == str(tmp_path / "home" / ".cache" / "cnn_jax" / "jax")


def test_stats_count_hits_and_misses_only():
    stats = compile_cache.CacheStats("/cache")
    for event in (compile_cache.MISS_EVENT, compile_cache.HIT_EVENT, compile_cache.HIT_EVENT,
                  "/jax/compilation_cache/compile_requests_use_cache"):
        stats.record(event)
    for event, seconds in ((compile_cache.STAGE_EVENTS[0], 0.25), (compile_cache.STAGE_EVENTS[2], 1.0),
                           ("/jax/some/other_duration", 5.0)):
        stats.record_duration(event, seconds)
    assert (stats.hits, stats.misses) == (2, 1)
    assert stats.describe().startswith("compilation cache partly hit: 2 programs loaded, 1 compiled, 1.25 s compiling")


PROBE = """
import sys
from cnn_jax import compile_cache
import jax.numpy as jnp
stats = compile_cache.enable(sys.argv[1])
jnp.sin(jnp.arange(3.0)).block_until_ready()
print(stats.hits)
"""


def xla_reloads_its_own_programs(folder) -> bool:
    """Whether this CPU's XLA accepts programs it wrote: on some Intel CPUs jaxlib 0.10 rejects
    every cached CPU program (its loader takes the tuning flags +prefer-no-gather/-scatter for
    missing CPU features, openxla/xla#44565), so the cache can never hit there."""
    run = lambda: subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True,  # noqa: E731
                                 text=True, timeout=120, cwd=REPO_ROOT)
    run()
    return int(run().stdout.split()[-1]) > 0


@pytest.mark.slow
def test_a_second_process_loads_every_program_from_the_cache(mnist_dir, tmp_path):
    if not xla_reloads_its_own_programs(tmp_path / "probe"):
        pytest.skip("this CPU's XLA rejects the programs it cached (openxla/xla#44565)")

    def train(*extra):
        result = script_runner.run(
            [sys.executable, TRAIN, f"--data_dir={mnist_dir}", "--train_subset=640", "--test_subset=200",
             f"--compilation_cache_dir={tmp_path / 'cache'}", *extra], timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    pattern = r"^compilation cache (\w+(?: hit)?): (\d+) programs loaded, (\d+) compiled, [\d.]+ s compiling"
    first_out = train()
    first = re.search(pattern, first_out, re.M)
    assert first and first.group(1) == "missed" and int(first.group(3)) > 0, first
    second_out = train()
    second = re.search(pattern, second_out, re.M)
    assert second and second.group(1) == "hit", second_out
    assert int(second.group(2)) >= int(first.group(3)) and int(second.group(3)) == 0
    epoch = re.compile(r"^(Epoch 0\. Loss: [\d.]+, Train_acc [\d.]+, Test_acc [\d.]+)", re.M)
    assert epoch.findall(second_out) == epoch.findall(first_out) != []   # the same programs, the same numbers


def test_a_cache_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = subprocess.run([sys.executable, TRAIN, f"--compilation_cache_dir={blocker / 'cache'}"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: cannot use {blocker / 'cache'} as the compilation cache (Not a "
                                     "directory): give a writable --compilation_cache_dir, or --nocompilation_cache")
