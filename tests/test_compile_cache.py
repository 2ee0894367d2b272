"""The persistent compilation cache: a second process loads what the first compiled."""

import os
import re
import subprocess
import sys

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import script_runner
from conftest import REPO_ROOT

from cnn_jax.engine import compile_cache

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
    stats.record(compile_cache.EXECUTABLE_HIT_EVENT)
    stats.record_duration(compile_cache.EXECUTABLE_DURATION_EVENT, 0.5)
    assert (stats.hits, stats.whole, stats.misses) == (3, 1, 1)
    assert stats.describe().startswith("compilation cache partly hit: 3 programs loaded (1 whole, without tracing), "
                                       "1 compiled, 1.75 s compiling")


def traced_program(traces: list):
    """A fresh jitted function (its own jit cache) with a static argument; each trace appends to `traces`."""

    @functools.partial(jax.jit, static_argnums=(1,))
    def program(x, power):
        traces.append(power)
        return jnp.sum(x ** power) * jnp.arange(3.0)

    return program


def test_an_executable_saved_by_one_program_is_loaded_whole_by_the_next(tmp_path):
    traces = []
    x = jnp.linspace(0.0, 1.0, 8)
    args = (jax.ShapeDtypeStruct((8,), jnp.float32), 3)
    first = compile_cache.load_or_compile(traced_program(traces), args, context="ctx", folder=str(tmp_path))
    assert traces == [3] and len(list(tmp_path.glob("*.pkl"))) == 1
    second = compile_cache.load_or_compile(traced_program(traces), args, context="ctx", folder=str(tmp_path))
    assert traces == [3]   # loaded, not traced
    np.testing.assert_array_equal(np.asarray(second(x)), np.asarray(first(x)))
    np.testing.assert_allclose(np.asarray(second(x)), np.sum(np.linspace(0, 1, 8) ** 3) * np.arange(3.0), rtol=1e-6)


@pytest.mark.parametrize("change", ["context", "static", "shape", "dtype"])
def test_whatever_changes_the_program_changes_its_entry(tmp_path, change):
    traces = []
    base = dict(shape=(8,), dtype=jnp.float32, static=3, context="ctx")
    changed = {**base, change: {"context": "other", "static": 2, "shape": (9,), "dtype": jnp.int32}[change]}
    for spec in (base, changed):
        args = (jax.ShapeDtypeStruct(spec["shape"], spec["dtype"]), spec["static"])
        compile_cache.load_or_compile(traced_program(traces), args, context=spec["context"], folder=str(tmp_path))
    assert len(traces) == 2 and len(list(tmp_path.glob("*.pkl"))) == 2


def test_a_plugin_source_that_changes_is_a_new_entry(tmp_path):
    args = (jax.ShapeDtypeStruct((8,), jnp.float32), 3)
    keys = []
    for folder, text in (("a", "A = 1\n"), ("b", "A = 2\n"), ("c", "A = 1\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "plugin.py").write_text(text)
        keys.append(compile_cache.executable_key("f", args, "ctx", [str(tmp_path / folder / "plugin.py")]))
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_a_damaged_entry_is_compiled_again_and_never_saved_broken(tmp_path):
    # In this process JAX's own cache is on (conftest): the second compile is served by it, and
    # an executable XLA:CPU loaded from there would be saved without its code.
    traces = []
    x = jnp.ones(8)
    args = (jax.ShapeDtypeStruct((8,), jnp.float32), 2)
    compile_cache.load_or_compile(traced_program(traces), args, context="ctx", folder=str(tmp_path))
    [entry] = tmp_path.glob("*.pkl")
    entry.write_bytes(entry.read_bytes()[:100])
    for _ in range(2):
        again = compile_cache.load_or_compile(traced_program(traces), args, context="ctx", folder=str(tmp_path))
        np.testing.assert_array_equal(np.asarray(again(x)), 8.0 * np.arange(3.0))
    assert traces == [2, 2, 2] and list(tmp_path.glob("*.tmp")) == []


def test_a_folder_that_cannot_be_written_still_gives_the_program(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    traces = []
    compiled = compile_cache.load_or_compile(traced_program(traces), (jax.ShapeDtypeStruct((8,), jnp.float32), 1),
                                             context="ctx", folder=str(blocker / "executables"))
    np.testing.assert_array_equal(np.asarray(compiled(jnp.ones(8))), 8.0 * np.arange(3.0))
    assert blocker.read_text() == "not a folder"


def test_without_a_folder_it_compiles_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert compile_cache.executable_dir() is None   # only the scripts turn the cache on
    traces = []
    compiled = compile_cache.load_or_compile(traced_program(traces), (jax.ShapeDtypeStruct((8,), jnp.float32), 1),
                                             context="ctx")
    np.testing.assert_array_equal(np.asarray(compiled(jnp.ones(8))), 8.0 * np.arange(3.0))
    assert traces == [1] and list(tmp_path.iterdir()) == []


PROBE = """
import sys
from cnn_jax.engine import compile_cache
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

    pattern = (r"^compilation cache (?P<verdict>\w+(?: hit)?): (?P<loaded>\d+) programs loaded"
               r"(?: \((?P<whole>\d+) whole, without tracing\))?, (?P<compiled>\d+) compiled, [\d.]+ s compiling")
    first_out = train()
    first = re.search(pattern, first_out, re.M)
    assert first and first["verdict"] == "missed" and int(first["compiled"]) > 0 and not first["whole"], first_out
    second_out = train()
    second = re.search(pattern, second_out, re.M)
    assert second and second["verdict"] == "hit", second_out
    # The training program and the evaluation batch of each shape (640 train, 200 test images)
    # came whole from the executable cache, without tracing.
    assert second["whole"] == "3" and int(second["compiled"]) == 0, second_out
    assert len(list((tmp_path / "cache" / compile_cache.EXECUTABLES_SUBDIR).glob("*.pkl"))) == 3
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
