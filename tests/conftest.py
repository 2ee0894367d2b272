"""Shared fixtures: the real MNIST, found as the main job finds it (else the tests that need it skip),
loaded once, and one JAX compilation cache for the whole session (this process and every subprocess
the tests start)."""

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


# The tests that need the real MNIST (they request `mnist_source`, `mnist_dir` or `mnist`, directly or
# through another fixture) carry this marker: `-m real_mnist` selects them, `-m "not real_mnist"` leaves
# them out, and `--collect-only -q -m real_mnist` counts them.
REAL_MNIST_MARKER = "real_mnist"
REAL_MNIST_FIXTURES = {"mnist_source", "mnist_dir", "mnist"}


def pytest_configure(config):
    config.addinivalue_line("markers", f"{REAL_MNIST_MARKER}: needs the real MNIST (a test using the mnist fixtures "
                            "of tests/conftest.py); skipped where no source is found")


@pytest.fixture(scope="session")
def mnist_source():
    """Where the tests' MNIST comes from: the main job's first source (`cnn_jax.data.sources.find_source`,
    the same order: $CNN_JAX_MNIST_DIR, $CNN_JAX_DATA_DIR/mnist, a prepared TFDS copy, ../shared/data/mnist,
    a TFDS download when online). None found: every test that needs it skips, with one reason line."""
    from cnn_jax.data import sources as data
    try:
        return data.find_source("mnist")
    except data.DataError as e:
        pytest.skip(f"real MNIST not found, so the tests that need it skip: {e}")


def write_idx_folder(folder: str, dataset) -> str:
    """Write `dataset` (a cnn_jax.data.sources.Dataset of 28x28x1 images in [0, 1]) as the four gzipped MNIST IDX
    files in `folder` (created); returns `folder`."""
    import gzip

    import numpy as np
    from cnn_jax.data import sources as data
    os.makedirs(folder, exist_ok=True)
    for key, stem in data.IDX_FILES.items():
        array = getattr(dataset, key)
        if key.endswith("images"):
            array = np.rint(array[..., 0] * 255)
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(os.path.join(folder, stem + ".gz"), "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())
    return folder


@pytest.fixture(scope="session")
def mnist_dir(mnist_source, tmp_path_factory) -> str:
    """A folder holding the four MNIST IDX files, for --data_dir and the file-level tests: the source's
    own folder, or, for a TensorFlow Datasets source, the files written from its arrays once a session.
    A source that is found but does not hold the files fails the tests in one line."""
    from cnn_jax.data import sources as data
    if mnist_source.kind == "tfds":
        try:
            dataset = data.load_source("mnist", mnist_source)
        except data.DataError as e:
            pytest.fail(f"the tests' MNIST source ({mnist_source.describe('mnist')}) cannot be read: {e}",
                        pytrace=False)
        return write_idx_folder(str(tmp_path_factory.mktemp("tfds_idx") / "mnist"), dataset)
    folder = mnist_source.location
    missing = [stem for stem in data.IDX_FILES.values()
               if not any(os.path.isfile(os.path.join(folder, stem + ext)) for ext in (".gz", ""))]
    if missing:
        pytest.fail(f"the tests' MNIST source ({mnist_source.describe('mnist')}) lacks {', '.join(missing)} "
                    f"(.gz or raw); set CNN_JAX_MNIST_DIR=FOLDER holding the four IDX files", pytrace=False)
    return folder


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """The whole real MNIST, loaded once a session."""
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
    """Marks the tests that need the real MNIST (REAL_MNIST_MARKER); then puts the files holding slow
    tests first, each file's tests kept together and in order (so a
    module's fixtures are built once): pytest-xdist hands files out in this order, and the longest
    start early instead of leaving one worker busy at the end."""
    for item in items:
        if REAL_MNIST_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(REAL_MNIST_MARKER)
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)
