"""Shared fixtures: the real MNIST files, a small real subset loaded once, and one JAX compilation
cache for the whole session (this process and every subprocess the tests start)."""

import os
import signal

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite's programs train on a few hundred images, so compiling them is most of their cost, and
# LLVM's optimisation level 0 compiles them ~40% faster (docs/testing.md). XLA's own passes (fusion
# included) are unchanged; the results differ from -O3's by rounding only, as they do between CPUs,
# which every tolerance must hold against anyway (tests/numerics.py). Set before JAX starts, here
# and, through the environment, in every process the tests start.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def default_sigint() -> None:
    """`preexec_fn` of a child the tests interrupt with SIGINT: the signal at its default even when
    pytest itself ignores it (started as a shell's background job), so the child's Python turns it
    into KeyboardInterrupt as it does in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a process the tests start: the suite's own, plus `extra`."""
    return " ".join([os.environ["XLA_FLAGS"], *extra])


MNIST_DIR = os.environ.get("CNN_JAX_MNIST_DIR", os.path.join(REPO_ROOT, "..", "shared", "data", "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    if not os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"real MNIST IDX files not found in {MNIST_DIR}; set CNN_JAX_MNIST_DIR")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from cnn_jax.data import sources as data
    return data.load_idx_dir(mnist_dir, "mnist")


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent compilation cache per test process, in pytest's temporary folder: the same
    programs (a training step compiled by several tests and scripts) are compiled once. Set through
    jax.config here and through the JAX_* variables for subprocesses; every entry is cached. Each
    pytest-xdist worker has its own (JAX writes an entry in place, so processes that run at the
    same time must not share a folder), and no size limit (a limit makes JAX scan the whole folder
    at every write)."""
    import jax
    folder = tmp_path_factory.mktemp("jax_cache")
    values = {"JAX_COMPILATION_CACHE_DIR": str(folder), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield str(folder)


def pytest_collection_modifyitems(config, items):
    """The files holding slow tests first, each file's tests kept together and in order (so a
    module's fixtures are built once): pytest-xdist hands files out in this order, and the longest
    start early instead of leaving one worker busy at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
