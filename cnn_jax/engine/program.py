"""The program builder: what the training loop runs for a set of runs of one shape, built once.

Runs whose configs differ only in `PER_RUN_FIELDS` share one program: the config with those
fields at their defaults (`program_key`) decides it, and the per-run values live in each
run's TrainState (optimiser hyperparameters in the optimiser state, the seed in its rng and
initial params). `build` turns the runs' configs into a `Program`: the optimiser, the initial
states, the compiled runner and the compiled evaluation.

The one choice between programs is here: a single run trains its own, unvmapped program (the
one `experiments/train.py` runs, compiled ahead and kept whole in the compilation cache, data
parallel over all devices), so a run gives the same digits whether it is trained alone, in a
sweep or as a search trial; several runs train as one program vmapped over a leading run axis.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnn_jax import model
from cnn_jax.config import Config, fields_with_role
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import compile_cache, evaluation, optim, parallel, state as state_lib, step as step_lib
from cnn_jax.engine.state import TrainState
from cnn_jax.nn import lowering

# Fields that may differ between the runs of one program (the role `per_run`, `config.ROLES`): the
# optimiser's hyperparameters first, in their order.
PER_RUN_FIELDS = optim.HYPERPARAMS + tuple(f for f in fields_with_role("per_run") if f not in optim.HYPERPARAMS)


def program_key(config: Config) -> Config:
    """The config with every per-run field at its default: runs with equal keys share one program."""
    defaults = Config()
    return dataclasses.replace(config, **{f: getattr(defaults, f) for f in PER_RUN_FIELDS})


def resolve_loop(config: Config) -> str:
    """The execution strategy: `auto` is a scanned epoch (measured fastest), except one call per
    batch for XLA:CPU's own convolution (`lowering.resolve`, docs/performance.md)."""
    return lowering.resolve(config).loop


def compiled_runner(config: Config, total_steps: int, loop: str):
    """(optimizer, jitted runner) of one run. Runs of one program key reuse it through the
    `Program` that holds it (`build`'s `programs`), not through a cache of this module."""
    optimizer = optim.make_optimizer(config, total_steps)
    train_step = parallel.data_parallel(config).wrap_step(step_lib.make_train_step(config, optimizer))
    return optimizer, step_lib.make_runner(config, train_step, loop)


def compiled_group_runner(key: Config, total_steps: int, loop: str):
    """The jitted runner of several runs: the train step vmapped over the run axis of the state
    and of the batches. The per-run values it reads are in the state, so one key compiles once
    per group size."""
    train_step = step_lib.make_train_step(key, optim.make_optimizer(key, total_steps))
    return step_lib.make_runner(key, jax.vmap(train_step), loop)


Ahead = tuple[Callable, dict[tuple[int, ...], Callable]]


def compile_ahead(config: Config, dataset: data_lib.Dataset, optimizer: optax.GradientTransformation,
                  runner: Callable, loop: str, num_steps: int) -> Ahead | None:
    """Compile a single run's programs for the dataset's shapes, from abstract values: (the
    training runner for whole epochs, called without the static step count; the evaluation batch
    per batch shape, called as `evaluation.evaluate`'s `batch_fn`), or None if compiling failed.

    They go through `compile_cache.load_or_compile`: when a script turned the caches on, a second
    run of the same config loads them whole, without tracing. Run in a thread, the compiles
    overlap drawing the initial params (also mostly compilation, on one core). A failure here
    is left for the real call to report."""
    try:
        state = state_lib.abstract(config, optimizer)
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)   # noqa: E731
        data = (spec(dataset.train_images), spec(dataset.train_labels),
                jax.ShapeDtypeStruct(dataset.train_labels.shape, jnp.int32))
        first = jax.ShapeDtypeStruct((), jnp.int32)
        args = (state, *data, first) + (() if loop == "step" else (num_steps,))
        sources = (model.family(config).__file__,)
        whole_epochs = compile_cache.load_or_compile(runner, args, context=(config, num_steps * config.epochs, loop),
                                                     sources=sources)
        inference = model.inference_config(config)
        evals = {}
        for images, labels in ((dataset.train_images, dataset.train_labels),
                               (dataset.test_images, dataset.test_labels)):
            batch = step_lib.abstract_batch(images, labels, config.eval_batch_size)
            if batch[0].shape not in evals:
                evals[batch[0].shape] = compile_cache.load_or_compile(
                    step_lib.eval_batch, (state_lib.eval_params(state), state.model_state, *batch, inference),
                    context=inference, sources=sources)
        return whole_epochs, evals
    except Exception:  # noqa: BLE001 - the same error surfaces, in context, from the real call
        return None


def whole_epoch_runner(runner: Callable, compiled: Callable, num_steps: int) -> Callable:
    """`runner`, but calls for one step (step loop) or a whole epoch of `num_steps` (scan loop)
    go to `compiled`, its program compiled ahead by `compile_ahead`."""

    def run(state, images, labels, order, first, *count):
        if count in ((), (num_steps,)):
            return compiled(state, images, labels, order, first)
        return runner(state, images, labels, order, first, *count)   # a resumed epoch's remainder

    return run


Evaluate = Callable[[TrainState, Any, Any, bool], list[dict[str, Any]]]


@dataclasses.dataclass
class Program:
    """What the loop runs for R runs of one key: R = 1 unvmapped, R > 1 stacked on a run axis."""

    key: Config
    loop: str
    stacked: bool
    runner: Callable              # (state, images, labels, order, first[, count]) -> (state, metrics)
    evaluate: Evaluate            # (state, images, labels, predictions) -> one result per run
    place: Callable[[Any], Any]   # puts arrays where the runner wants them (replicated over devices)
    describe: str                 # the start-up `strategy:` line (and the layer shapes with --debug)


def _single(config: Config, dataset: data_lib.Dataset, num_steps: int,
            state: TrainState | None) -> tuple[Program, TrainState]:
    """One run's program: compiled ahead in a thread while its initial state is drawn."""
    loop = resolve_loop(config)
    key = program_key(config)
    optimizer, runner = compiled_runner(key, num_steps * config.epochs, loop)
    dp = parallel.data_parallel(config)   # a no-op on one device
    compiled: list[Ahead | None] = []
    compiling = None
    if dp.mesh is None:   # sharded arguments would compile another program
        compiling = threading.Thread(target=lambda: compiled.append(compile_ahead(
            key, dataset, optimizer, runner, loop, num_steps)), daemon=True)
        compiling.start()
    state = initial_state([config], num_steps, state)
    evals: dict[tuple[int, ...], Callable] = {}
    if compiling is not None:
        compiling.join()
        if compiled and compiled[0] is not None:
            whole_epochs, evals = compiled[0]
            runner = whole_epoch_runner(runner, whole_epochs, num_steps)

    def evaluate(state: TrainState, images: Any, labels: Any, predictions: bool = False) -> list[dict[str, Any]]:
        shape = step_lib.abstract_batch(images, labels, config.eval_batch_size)[0].shape
        return [evaluation.evaluate(state_lib.eval_params(state), state.model_state, images, labels, key,
                                    return_predictions=predictions, batch_fn=evals.get(shape))]

    state = dp.replicate(state)
    describe = f"strategy: {model.strategy(config).describe()}, {dp.describe()}"
    if config.debug:
        describe += "\n" + model.format_layer_shapes(config)
    return Program(key, loop, False, runner, evaluate, dp.replicate, describe), state


def _stacked(configs: Sequence[Config], num_steps: int) -> tuple[Program, TrainState]:
    """Several runs' program: the step vmapped over the run axis; each run's own initial state."""
    config = configs[0]
    loop, key, total = resolve_loop(config), program_key(config), num_steps * config.epochs
    runner = compiled_group_runner(key, total, loop)
    state = initial_state(configs, num_steps)

    def evaluate(state: TrainState, images: Any, labels: Any, predictions: bool = False) -> list[dict[str, Any]]:
        result = evaluation.evaluate_runs(state_lib.eval_params(state), state.model_state, images, labels, key,
                                          return_predictions=predictions)
        return [{name: value[r] for name, value in result.items()} for r in range(len(result["loss"]))]

    describe = (f"strategy: {model.strategy(config).describe()}, {len(configs)} runs vmapped as one program")
    return Program(key, loop, True, runner, evaluate, lambda tree: jax.tree.map(jnp.asarray, tree), describe), state


def initial_state(configs: Sequence[Config], num_steps: int, start: TrainState | None = None) -> TrainState:
    """The runs' initial states (stacked on a run axis when there are several), each with its own
    hyperparameters in its optimiser state, not the key's; `start` (one run) continues a saved one."""
    if start is not None:
        return start
    states = [state_lib.create(c, optim.make_optimizer(c, num_steps * c.epochs)) for c in configs]
    return states[0] if len(states) == 1 else state_lib.stack(states)


def build(configs: Sequence[Config], dataset: data_lib.Dataset, num_steps: int, start: TrainState | None = None,
          programs: dict[tuple, Program] | None = None) -> tuple[Program, TrainState]:
    """(the program, the initial state on its devices) for `configs` (one `program_key`); `start`
    (one run only) continues a saved state instead of drawing a fresh one.

    `programs` holds the programs built before (a sweep or a search passes one dict for all its
    groups): one built for the same key, group size and data shapes is reused, so the next run
    of a sweep draws its state and trains without compiling again."""
    if len({program_key(c) for c in configs}) != 1:
        raise ValueError("runs trained together must differ only in PER_RUN_FIELDS")
    if len(configs) > 1 and start is not None:
        raise ValueError("only a single run continues a saved state")
    shapes = (program_key(configs[0]), len(configs), num_steps, dataset.train_images.shape,
              dataset.train_images.dtype.str, dataset.test_images.shape)
    if programs is not None and shapes in programs:
        program = programs[shapes]
        return program, program.place(initial_state(configs, num_steps, start))
    program, state = (_stacked(configs, num_steps) if len(configs) > 1
                      else _single(configs[0], dataset, num_steps, start))
    if programs is not None:
        programs[shapes] = program
    return program, state


def take(state: TrainState, keep: Sequence[int]) -> TrainState:
    """The runs `keep` of a stacked state, in that order (a group after some runs stopped)."""
    index = jnp.asarray(np.asarray(keep), jnp.int32)
    return jax.tree.map(lambda x: jnp.take(x, index, axis=0), state)
