"""How many runs of a sweep fit in one vmapped group: the memory the group's programs need,
measured from their traced programs, against the memory that is free.

The estimate walks the jaxprs of the programs a group really runs (`step.make_train_step` at
`batch_size`, `step.eval_batch` at `eval_batch_size` with the inference lowering), so it follows
whatever a model family and its lowerings materialise (im2col patches, Winograd tiles, saved
residuals of custom VJPs, batch-norm statistics) without knowing the family. Why the jaxpr and
not XLA's own `compiled.memory_analysis()`: that needs a full compile of each program, far
slower than a trace on CPU, for a figure the sweep only uses to pick a group size. A jaxpr's live values at its peak bound what the compiled program
holds from above: XLA fuses elementwise chains and reuses buffers, it never keeps more alive.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Jaxpr, Var, jaxprs_in_params

from cnn_jax import model
from cnn_jax.config import Config
from cnn_jax.engine import evaluation, optim
from cnn_jax.engine import state as state_lib
from cnn_jax.engine import step as step_lib

# Bytes of memory that `auto_max_parallel` lets one group use, as a fraction of what is free.
MEMORY_FRACTION = 0.25


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays (or shape-dtype structs) of a pytree."""
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def _var_bytes(var: Any) -> int:
    aval = var.aval
    return math.prod(aval.shape) * aval.dtype.itemsize if hasattr(aval, "dtype") else 0


def peak_live_bytes(jaxpr: Jaxpr) -> int:
    """The most bytes of values a jaxpr holds at once beyond its inputs, running its equations in
    order and freeing each value after its last use. An equation holding sub-jaxprs (jit,
    custom_vjp, scan, cond, ...) holds, while it runs, the larger of its outputs and its
    sub-jaxprs' own peak."""
    last_use = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for var in eqn.invars:
            if isinstance(var, Var):
                last_use[var] = i
    for var in jaxpr.outvars:
        if isinstance(var, Var):
            last_use[var] = len(jaxpr.eqns)
    live: dict[Any, int] = {}
    peak = 0
    for i, eqn in enumerate(jaxpr.eqns):
        outputs = sum(_var_bytes(var) for var in eqn.outvars)
        inner = max((peak_live_bytes(sub) for sub in jaxprs_in_params(eqn.params)), default=0)
        peak = max(peak, sum(live.values()) + max(outputs, inner))
        live.update((var, _var_bytes(var)) for var in eqn.outvars)
        for var in [v for v in live if last_use.get(v, -1) <= i]:
            del live[var]
    return peak


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """Bytes one run's programs need: its train state, a training step (the batch and the step's
    peak) and an evaluation batch (the batch and the evaluation's peak)."""

    state: int
    train_step: int
    eval_batch: int


@functools.lru_cache(maxsize=64)
def program_memory(config: Config) -> ProgramMemory:
    """`ProgramMemory` of `config`, from the jaxprs of its train step and its evaluation batch."""
    optimizer = optim.make_optimizer(config, 1)
    state = state_lib.abstract(config, optimizer)
    images, labels = (config.batch_size, *config.input_shape), (config.batch_size,)
    train_batch = (jax.ShapeDtypeStruct(images, jnp.float32), jax.ShapeDtypeStruct(labels, jnp.int32))
    train_jaxpr = jax.make_jaxpr(step_lib.make_train_step(config, optimizer))(state, train_batch).jaxpr
    n = config.eval_batch_size
    eval_batch = (jax.ShapeDtypeStruct((n, *config.input_shape), jnp.float32),
                  jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_))
    inference = model.inference_config(config)
    eval_jaxpr = jax.make_jaxpr(lambda params, model_state, *batch: step_lib.eval_batch(
        params, model_state, *batch, inference))(state.params, state.model_state, *eval_batch).jaxpr
    return ProgramMemory(tree_bytes(state), tree_bytes(train_batch) + peak_live_bytes(train_jaxpr),
                         tree_bytes(eval_batch) + peak_live_bytes(eval_jaxpr))


def run_memory_bytes(config: Config) -> int:
    """An upper bound on the memory each run adds to a group of `config`'s runs: its train state
    and a training step (the group's vmapped step holds every run's at once), plus, where the
    group's runs are evaluated together (accelerators), an evaluation batch."""
    memory = program_memory(config)
    if evaluation.runs_evaluated_together():
        return memory.state + max(memory.train_step, memory.eval_batch)
    return memory.state + memory.train_step


def shared_memory_bytes(config: Config) -> int:
    """Memory a group of `config`'s runs needs once, whatever its size: where runs are evaluated
    one after another (CPU), one evaluation batch; else nothing."""
    return 0 if evaluation.runs_evaluated_together() else program_memory(config).eval_batch


def memory_budget() -> int:
    """Bytes a group may use: a fraction of the accelerator's memory, or of free host memory on CPU."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = 4 << 30
    return int(free * MEMORY_FRACTION)


def auto_max_parallel(config: Config, budget_bytes: int) -> int:
    """How many runs of `config`'s group fit in `budget_bytes` (at least 1)."""
    return max(1, (budget_bytes - shared_memory_bytes(config)) // run_memory_bytes(config))


def default_max_parallel(config: Config) -> int:
    """`--max_parallel=0`: the group size that trains the most images per second on this backend.

    On CPU one run at a time: a vmapped group trains fewer images per second there than the same
    runs one after another in one process (docs/search.md, "Measurements"), and
    a run alone trains the program `experiments/train.py` runs, so it gives the same digits. On
    accelerators, where vmapping is where the speed comes from, as many runs as fit in `memory_budget()`.
    """
    if jax.default_backend() == "cpu":
        return 1
    return auto_max_parallel(config, memory_budget())


def describe_grouping(given: int) -> str:
    """The start-up line saying how runs are grouped and how to change it (`given`: --max_parallel)."""
    if given:
        return f"groups: up to {given} run(s) vmapped as one program (--max_parallel={given})"
    if jax.default_backend() == "cpu":
        return ("groups: one run at a time on CPU, each the program it trains alone (a vmapped group trains "
                "fewer images/s here; --max_parallel=N vmaps N runs together)")
    return (f"groups: as many runs as fit in memory, vmapped as one program on {jax.default_backend()} "
            "(--max_parallel=N caps it)")
