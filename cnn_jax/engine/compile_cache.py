"""Compiled programs kept on disk, for the scripts: a second run of the same config (or a rerun
of a sweep) loads its programs instead of compiling them.

Two caches share one folder. JAX's persistent compilation cache keeps every program, keyed by
its lowered module, so a hit still traces and lowers the program to find its key. The programs
costly to trace (`train.fit`'s training runner and evaluation batches) are also kept whole in
`executables/` (`load_or_compile`), keyed by what determines them (the caller's context, argument
shapes, the cnn_jax sources, the JAX build, its flags and the CPU), so a hit skips tracing too.

Turning the caches on changes process-wide settings, so only scripts call `enable`
(`cli.main_guard` does it for every script that defines the cache flags). A cached program is
the same executable XLA would compile again: results are unchanged. The files are pickles and
executables: load them only from a folder of your own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import pickle
import platform
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jaxlib
from jax import monitoring
from jax.experimental import serialize_executable

from cnn_jax.config import ConfigError

HIT_EVENT = "/jax/compilation_cache/cache_hits"
MISS_EVENT = "/jax/compilation_cache/cache_misses"
# The package root: every cnn_jax source file is part of an executable's cache key.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXECUTABLE_HIT_EVENT = "/cnn_jax/executable_cache/hits"
EXECUTABLE_DURATION_EVENT = "/cnn_jax/executable_cache/duration"
# The stages of compiling one program: Python to jaxpr, jaxpr to StableHLO (both needed for the
# cache key, so they run on a hit too), and XLA's compile or, on a hit, the load from the cache;
# and the executable cache's own reads and writes.
STAGE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                "/jax/core/compile/backend_compile_duration", EXECUTABLE_DURATION_EVENT)
EXECUTABLES_SUBDIR = "executables"
# An XLA option that changes nothing in the program (how many buffers debug dumps list) but is
# part of JAX's cache key: set per entry, it keeps JAX's cache from serving the entry's compile.
FRESH_COMPILE_OPTION = "xla_debug_buffer_assignment_show_max"
_executable_dir: str | None = None   # set by `enable`: the scripts' executable cache


def default_dir() -> str:
    """Where the cache lives when no folder is given: JAX's own `$JAX_COMPILATION_CACHE_DIR` when
    set, else `$XDG_CACHE_HOME/cnn_jax/jax` (`~/.cache/cnn_jax/jax` without XDG_CACHE_HOME)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cnn_jax", "jax")


@dataclasses.dataclass
class CacheStats:
    """Programs loaded from the cache (hits) and compiled and written to it (misses) so far."""

    directory: str
    hits: int = 0
    misses: int = 0
    whole: int = 0         # of the hits, executables loaded whole (no tracing)
    seconds: float = 0.0   # in the stages of STAGE_EVENTS, summed over threads

    def record(self, event: str, **kwargs: object) -> None:
        del kwargs
        if event in (HIT_EVENT, EXECUTABLE_HIT_EVENT):
            self.hits += 1
            self.whole += event == EXECUTABLE_HIT_EVENT
        elif event == MISS_EVENT:
            self.misses += 1

    def record_duration(self, event: str, seconds: float, **kwargs: object) -> None:
        del kwargs
        if event in STAGE_EVENTS:
            self.seconds += seconds

    def describe(self) -> str:
        verdict = "hit" if self.hits and not self.misses else ("partly hit" if self.hits else "missed")
        whole = f" ({self.whole} whole, without tracing)" if self.whole else ""
        return (f"compilation cache {verdict}: {self.hits} programs loaded{whole}, {self.misses} compiled, "
                f"{self.seconds:.2f} s compiling (trace, lower, XLA or cache load) "
                f"({self.directory}; --nocompilation_cache turns it off)")


def enable(directory: str | None = None) -> CacheStats:
    """Keep every compiled program in `directory` (default: `default_dir()`) and count the
    cache's hits and misses from now on; a folder that cannot be made is a ConfigError.
    Process-wide: for scripts, not library code."""
    directory = os.path.abspath(os.path.expanduser(directory or default_dir()))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot use {directory} as the compilation cache ({e.strerror or e}): give a "
                          "writable --compilation_cache_dir, or --nocompilation_cache") from None
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, however quick to compile: a run compiles many small ones, and together
    # they are most of a short run's start-up.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    global _executable_dir
    _executable_dir = os.path.join(directory, EXECUTABLES_SUBDIR)
    stats = CacheStats(directory)
    monitoring.register_event_listener(stats.record)
    monitoring.register_event_duration_secs_listener(stats.record_duration)
    return stats


def executable_dir() -> str | None:
    """The folder of whole executables when a script turned the caches on (`enable`), else None."""
    return _executable_dir


@functools.lru_cache(maxsize=None)
def _sources_digest(paths: tuple[str, ...]) -> str:
    """sha256 of the names and contents of the Python files at `paths` (files, or folders searched
    for *.py), in path order."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += [os.path.join(root, name) for root, _, names in os.walk(path)
                      for name in names if name.endswith(".py")]
        else:
            files.append(path)
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(os.path.basename(name).encode())
        with open(name, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _cpu_description() -> str:
    """This CPU's model and instruction-set flags (XLA:CPU compiles for them), or '' unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return ""


def _abstract(value: Any) -> str:
    """An argument as its key: shape and dtype (and weak type) of arrays, the repr of the rest."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{tuple(value.shape)}:{value.dtype}:{getattr(value, 'weak_type', False)}"
    return repr(value)


def executable_key(name: str, args: Sequence[Any], context: Any, sources: Sequence[str]) -> str:
    """The file name of program `name` compiled for `args` (abstract or real) in `context` (what the
    program closes over, e.g. the config): a hash of all that, the sources, the JAX and jaxlib
    versions, JAX's flags (but the caches' own), $XLA_FLAGS, the backend and devices, and the CPU."""
    leaves, tree = jax.tree.flatten(list(args))
    device = jax.devices()[0]
    flags = {k: v for k, v in jax.config.values.items() if "cache" not in k}
    parts = [name, repr(context), str(tree), *map(_abstract, leaves),
             _sources_digest(tuple(sources) + (PACKAGE_DIR,)),
             jax.__version__, jaxlib.__version__, sys.version, platform.machine(), repr(sorted(flags.items())),
             os.environ.get("XLA_FLAGS", ""), device.platform, device.client.platform_version,
             device.device_kind, str(jax.device_count()), _cpu_description()]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def load_or_compile(jitted: Any, args: Sequence[Any], *, context: Any, sources: Sequence[str] = (),
                    folder: str | None = None) -> Callable:
    """`jitted.lower(*args).compile()`: the compiled program, called with the non-static args.

    With a `folder` (default: `executable_dir()`, set by the scripts), the executable is loaded
    from it when a previous process saved it under the same `executable_key` (no tracing, no
    lowering), else compiled and saved there. `context` must hold everything the function closes
    over that changes the program; `sources`, files of code outside cnn_jax it runs (a plugin
    family). The folder is an optimisation only: an entry that cannot be read (damaged, from an
    XLA that rejects it) is removed and compiled again; one that cannot be written is skipped; a
    program that JAX's cache served is not saved (XLA:CPU would write it without its code)."""
    folder = folder if folder is not None else executable_dir()
    if folder is None:
        return jitted.lower(*args).compile()
    start = time.perf_counter()
    name = getattr(jitted, "__qualname__", repr(jitted))
    path = os.path.join(folder, executable_key(f"{getattr(jitted, '__module__', '')}.{name}", args, context,
                                               sources) + ".pkl")
    try:
        with open(path, "rb") as f:
            compiled = serialize_executable.deserialize_and_load(*pickle.load(f))
        monitoring.record_event(EXECUTABLE_HIT_EVENT)
        monitoring.record_event_duration_secs(EXECUTABLE_DURATION_EVENT, time.perf_counter() - start)
        return compiled
    except FileNotFoundError:
        pass
    except Exception:  # noqa: BLE001 - damaged, or rejected by this XLA: compile it again
        with contextlib.suppress(OSError):
            os.unlink(path)
    _watch_jax_cache()
    _compiling.loaded_by_jax = False
    # Compiled fresh by XLA, not loaded from JAX's cache: XLA:CPU serializes the programs it
    # loaded without their code. The option makes JAX's key this entry's own.
    marker = 10**6 + int(hashlib.sha256(path.encode()).hexdigest(), 16) % 2**30
    compiled = jitted.lower(*args).compile({FRESH_COMPILE_OPTION: marker})
    if not _compiling.loaded_by_jax:
        start = time.perf_counter()
        _save(compiled, path)
        monitoring.record_event_duration_secs(EXECUTABLE_DURATION_EVENT, time.perf_counter() - start)
    return compiled


_compiling = threading.local()   # loaded_by_jax: whether JAX's cache served this thread's compile


@functools.lru_cache(maxsize=None)
def _watch_jax_cache() -> None:
    """Note JAX's cache hits in `_compiling`, per thread (once per process)."""

    def note(event: str, **kwargs: object) -> None:
        del kwargs
        if event == HIT_EVENT:
            _compiling.loaded_by_jax = True

    monitoring.register_event_listener(note)


def _save(compiled: Any, path: str) -> None:
    """Write `compiled` to `path` atomically (a temporary file renamed); skip it if it cannot be
    serialized or written."""
    temporary = None
    try:
        payload = pickle.dumps(serialize_executable.serialize(compiled))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix=".tmp", delete=False) as f:
            temporary = f.name
            f.write(payload)
        os.replace(temporary, path)
    except Exception:  # noqa: BLE001 - not serializable, or the folder is not writable
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
