"""JAX's persistent compilation cache, for the scripts: compiled programs kept on disk, so a
second run of the same config (or a rerun of a sweep) loads its programs instead of compiling.

Turning the cache on changes process-wide JAX settings, so only scripts call `enable`
(`cli.main_guard` does it for every script that defines the cache flags). A cached program is
the same executable XLA would compile again: results are unchanged.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from jax import monitoring

from cnn_jax.config import ConfigError

HIT_EVENT = "/jax/compilation_cache/cache_hits"
MISS_EVENT = "/jax/compilation_cache/cache_misses"
# The stages of compiling one program: Python to jaxpr, jaxpr to StableHLO (both needed for the
# cache key, so they run on a hit too), and XLA's compile or, on a hit, the load from the cache.
STAGE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                "/jax/core/compile/backend_compile_duration")


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
    seconds: float = 0.0   # in the stages of STAGE_EVENTS, summed over threads

    def record(self, event: str, **kwargs: object) -> None:
        del kwargs
        if event == HIT_EVENT:
            self.hits += 1
        elif event == MISS_EVENT:
            self.misses += 1

    def record_duration(self, event: str, seconds: float, **kwargs: object) -> None:
        del kwargs
        if event in STAGE_EVENTS:
            self.seconds += seconds

    def describe(self) -> str:
        verdict = "hit" if self.hits and not self.misses else ("partly hit" if self.hits else "missed")
        return (f"compilation cache {verdict}: {self.hits} programs loaded, {self.misses} compiled, "
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
    stats = CacheStats(directory)
    monitoring.register_event_listener(stats.record)
    monitoring.register_event_duration_secs_listener(stats.record_duration)
    return stats
