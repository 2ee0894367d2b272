"""Where a script's compile time goes: run it and, at exit, list every program JAX traced, lowered
and compiled (or loaded from the persistent compilation cache), with the seconds of each stage.

    python experiments/compile_times.py experiments/train.py --pool=max --nocompilation_cache
    python experiments/compile_times.py experiments/train.py --pool=max     # a second run: cache loads

The script runs as `__main__` in this process with the flags given after it; JAX's own monitoring
events time the stages (trace: Python to jaxpr; lower: jaxpr to StableHLO; backend: XLA compile, or
the cache load on a hit). Programs compiled on a background thread overlap the main thread, so the
stages' sum can exceed the wall time they took.
"""

from __future__ import annotations

import atexit
import collections
import runpy
import sys
import threading
import time

from jax import monitoring

STAGES = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "backend"}
CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompileLog:
    """Seconds per (function name, stage); the programs given to XLA (compiled or loaded) and the
    persistent cache's hits counted."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        self.compiled: collections.Counter[str] = collections.Counter()   # backend compiles (or loads)
        self.cache_hits = 0
        self._lock = threading.Lock()

    def on_duration(self, event: str, seconds: float, fun_name: str = "?", **kwargs: object) -> None:
        del kwargs
        if event in STAGES:
            if fun_name.startswith("jit(") and fun_name.endswith(")"):   # lower and backend name it so
                fun_name = fun_name[4:-1]
            with self._lock:
                self.seconds[fun_name][STAGES[event]] += seconds
                if STAGES[event] == "backend":
                    self.compiled[fun_name] += 1

    def on_event(self, event: str, **kwargs: object) -> None:
        del kwargs
        if event == CACHE_HIT:
            with self._lock:
                self.cache_hits += 1

    def format(self, wall: float, top: int = 12, wall_label: str = "process wall") -> str:
        """The programs by total seconds (the `top` largest, the rest summed), then the totals."""
        rows = sorted(self.seconds.items(), key=lambda kv: -sum(kv[1].values()))
        lines = [f"{'function':48s} {'trace s':>8s} {'lower s':>8s} {'backend s':>9s}"]
        for name, stages in rows[:top]:
            lines.append(f"{name[:48]:48s} {stages['trace']:8.3f} {stages['lower']:8.3f} {stages['backend']:9.3f}")
        rest = rows[top:]
        if rest:
            lines.append(f"{f'({len(rest)} more functions)':48s} "
                         + " ".join(f"{sum(s[k] for _, s in rest):{w}.3f}"
                                    for k, w in (("trace", 8), ("lower", 8), ("backend", 9))))
        totals = {k: sum(s[k] for _, s in rows) for k in ("trace", "lower", "backend")}
        lines.append(f"{sum(self.compiled.values())} programs, {self.cache_hits} loaded from the persistent cache; "
                     f"trace {totals['trace']:.2f} s, lower {totals['lower']:.2f} s, backend "
                     f"{totals['backend']:.2f} s (sum {sum(totals.values()):.2f} s); {wall_label} {wall:.1f} s")
        return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help", "--helpshort", "--helpfull"):
        print(__doc__.strip())
        return
    if len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        print("error: give the script to run first, then its flags, e.g. "
              "python experiments/compile_times.py experiments/train.py --pool=max", file=sys.stderr)
        sys.exit(2)
    start = time.perf_counter()
    log = CompileLog()
    monitoring.register_event_duration_secs_listener(log.on_duration)
    monitoring.register_event_listener(log.on_event)
    atexit.register(lambda: print(log.format(time.perf_counter() - start), flush=True))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
