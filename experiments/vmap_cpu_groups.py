"""Ways to train R runs of the tutorial CNN that share a data order (one seed, R learning rates) as
one program on CPU, timed against the same runs one after another. Experiment only: nothing here is
used by the package (`cnn_jax/sweep/memory.py::default_max_parallel` keeps one run at a time on CPU).

    python experiments/vmap_cpu_groups.py --data_dir=../shared/data/mnist --pool=max --runs=2,4,8

Variants, each a scanned epoch of `--steps` batches per run, interleaved in `--rounds` rounds:

- `sequential`: the run's own program (`program.compiled_runner`) called once per run;
- `vmapped`: the sweep's group program (`program.compiled_group_runner`), every run given the order;
- `shared_conv1`: one step for the group whose conv1 runs once on the shared batch with all runs'
  filters concatenated (R x filters output channels, one patches matmul forward and one for the
  weight gradient); the rest of the network vmapped over the runs;
- `shared_conv1_map`: the same conv1, the rest of the network run by `lax.map`, one run after
  another inside the program (one run's working set at a time);
- `shared_conv1_unrolled`: the same conv1, the rest written R times into the program, one copy
  per run (independent graphs that XLA:CPU may run side by side);
- `serial`: `unrolled` with each run's step chained after the previous run's (optimisation
  barriers), so that the program runs one run's working set at a time;
- `shared_conv1_serial`: conv1 forward once (filters concatenated), then each run's later layers
  forward and backward one run after another (chained), then conv1's backward once for all runs;
- `map_all`: the whole network by `lax.map` on the shared batch (conv1 not concatenated);
- `unrolled`: each run's own train step (`make_train_step`, unvmapped) on its slice of the stacked
  state, written R times into one program: R independent graphs that XLA:CPU may run side by side.

The optimiser update is vmapped in every group variant but `unrolled` and `serial`. Each group variant is checked against
`vmapped` (largest parameter difference after 5 steps). With `--batch_rows`, one run's own program
at batch R x `--batch_size` too (the group's images per step, one set of weights). Figures: images/s
of all runs together (best of the rounds) and the ratio to `sequential`'s best in the same process.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from cnn_jax import cli
from cnn_jax import config as config_lib
from cnn_jax.data import sources as data
from cnn_jax.engine import optim, program, state as state_lib, step as step_lib
from cnn_jax.models import cnn_blocks
from cnn_jax.nn import layers, lowering

GROUP_VARIANTS = ("shared_conv1", "shared_conv1_map", "shared_conv1_unrolled", "map_all", "unrolled",
                  "serial", "shared_conv1_serial")

cli.define_config_flags()
flags.DEFINE_list("runs", ["2", "4", "8"], "Group sizes R to time.")
flags.DEFINE_integer("steps", 64, "Batches per run in each timed call.")
flags.DEFINE_integer("rounds", 3, "Timed rounds (each variant once per round).")
flags.DEFINE_list("variants", list(GROUP_VARIANTS), "Group variants to time besides vmapped.")
flags.DEFINE_bool("batch_rows", False, "Also time one run at batch R x --batch_size (a group's images per step "
                  "in one run's program: what a larger working set costs).")
FLAGS = flags.FLAGS
LR_FACTORS = (1.0, 0.5, 2.0, 0.25)


def _per_run_layers(p, x, config, strategy, first: int):
    """Conv layers `first`.. , dense1 and output of one run from its CHWN input x."""
    for i in range(first, len(config.conv_filters) + 1):
        x = cnn_blocks.conv_block(x, p[f"conv{i}"]["w"], p[f"conv{i}"]["b"], config, strategy)
    x = layers.relu(cnn_blocks.dense_from_chwn(x, p["dense1"]["w"], p["dense1"]["b"], config.compute_dtype))
    return layers.dense(x, p["output"]["w"], p["output"]["b"], config.compute_dtype)


def group_logits(params, images: jax.Array, config: config_lib.Config, variant: str) -> jax.Array:
    """(R, N, classes): the logits of R runs' stacked params on one shared batch (N, H, W, C)."""
    strategy = lowering.resolve(config)
    x = jnp.transpose(images, (3, 1, 2, 0))                                    # CHWN
    if variant == "map_all":
        return jax.lax.map(lambda p: _per_run_layers(p, x, config, strategy, 1), params)
    w, b = params["conv1"]["w"], params["conv1"]["b"]                          # (R, kh, kw, C, O), (R, O)
    runs, kh, kw, c, o = w.shape
    y = cnn_blocks.conv_block(x, jnp.moveaxis(w, 0, 3).reshape(kh, kw, c, runs * o), b.reshape(runs * o),
                              config, strategy)                                # (R*O, H, W, N)
    y = y.reshape(runs, o, *y.shape[1:])
    rest = {name: layer for name, layer in params.items() if name != "conv1"}
    if variant == "shared_conv1_map":
        return jax.lax.map(lambda a: _per_run_layers(*a, config, strategy, 2), (rest, y))
    if variant == "shared_conv1_unrolled":
        return jnp.stack([_per_run_layers(state_lib.unstack(rest, r), y[r], config, strategy, 2)
                          for r in range(runs)])
    return jax.vmap(lambda p, x: _per_run_layers(p, x, config, strategy, 2))(rest, y)


def make_group_step(config: config_lib.Config, optimizer, variant: str) -> Callable:
    """A step over a stacked state and one shared (unstacked) batch: `make_train_step` vmapped,
    but for configs without augmentation or model state (the tutorial CNN's defaults). `unrolled`:
    each run's own `make_train_step` on its slice of the state, R independent graphs in one program."""
    if variant in ("unrolled", "serial"):
        one_step = step_lib.make_train_step(config, optimizer)

        def unrolled_step(state, batch):
            outs = []
            for r in range(state.step.shape[0]):
                mine = state_lib.unstack(state, r)
                if variant == "serial" and outs:   # run r starts once run r - 1's step is done
                    mine, _ = jax.lax.optimization_barrier((mine, outs[-1][0]))
                outs.append(one_step(mine, batch))
            return state_lib.stack([s for s, _ in outs]), state_lib.stack([m for _, m in outs])
        return unrolled_step
    if variant == "shared_conv1_serial":
        return _shared_conv1_serial_step(config, optimizer)

    def loss(params, images, labels):
        logits = group_logits(params, images, config, variant)
        losses = jax.vmap(lambda z: layers.softmax_cross_entropy(z, labels, config.label_smoothing))(logits)
        per_run = losses.sum(axis=1) if config.loss_reduction == "sum" else losses.mean(axis=1)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels[None], axis=1)
        return per_run.sum(), {"loss": losses.mean(axis=1), "correct": correct}   # runs' grads stay apart

    def update(g, opt_state, p):
        updates, opt_state = optimizer.update(g, opt_state, p)
        return optim.apply_updates(p, updates), opt_state

    def train_step(state, batch):
        grads, metrics = jax.grad(loss, has_aux=True)(state.params, *batch)
        params, opt_state = jax.vmap(update)(grads, state.opt_state, state.params)
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return train_step


def _shared_conv1_serial_step(config: config_lib.Config, optimizer) -> Callable:
    """conv1 forward once for all runs (filters concatenated); then each run's layers after conv1,
    forward and backward, one run after another (chained by optimisation barriers); then conv1's
    backward once for all runs; the optimiser update vmapped."""
    strategy = lowering.resolve(config)

    def conv1(w, b, x):
        return cnn_blocks.conv_block(x, w, b, config, strategy)

    def rest_loss(p, y, labels):
        logits = _per_run_layers(p, y, config, strategy, 2)
        losses = layers.softmax_cross_entropy(logits, labels, config.label_smoothing)
        loss = losses.sum() if config.loss_reduction == "sum" else losses.mean()
        return loss, {"loss": losses.mean(), "correct": jnp.sum(jnp.argmax(logits, axis=-1) == labels)}

    def update(g, opt_state, p):
        updates, opt_state = optimizer.update(g, opt_state, p)
        return optim.apply_updates(p, updates), opt_state

    def train_step(state, batch):
        images, labels = batch
        x = jnp.transpose(images, (3, 1, 2, 0))
        w, b = state.params["conv1"]["w"], state.params["conv1"]["b"]
        runs, kh, kw, c, o = w.shape
        y, conv1_vjp = jax.vjp(lambda w, b: conv1(w, b, x), jnp.moveaxis(w, 0, 3).reshape(kh, kw, c, runs * o),
                               b.reshape(runs * o))
        y = y.reshape(runs, o, *y.shape[1:])
        rest = {name: layer for name, layer in state.params.items() if name != "conv1"}
        grads, dys, metrics = [], [], []
        for r in range(runs):
            mine = (state_lib.unstack(rest, r), y[r])
            if dys:
                mine, _ = jax.lax.optimization_barrier((mine, dys[-1]))
            (g, dy), m = jax.grad(rest_loss, argnums=(0, 1), has_aux=True)(*mine, labels)
            grads.append(g)
            dys.append(dy)
            metrics.append(m)
        dw, db = conv1_vjp(jnp.concatenate(dys))
        grads = state_lib.stack(grads)
        grads["conv1"] = {"w": jnp.moveaxis(dw.reshape(kh, kw, c, runs, o), 3, 0), "b": db.reshape(runs, o)}
        params, opt_state = jax.vmap(update)(grads, state.opt_state, state.params)
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), state_lib.stack(metrics)

    return train_step


def _check(config: config_lib.Config) -> None:
    strategy = lowering.resolve(config)
    if (config.model != "cnn" or strategy.layout != "CHWN" or config.augment_shift or config.augment_flip
            or config.random_erasing or config.mixup_alpha or config.cutmix_alpha or config.ema_decay):
        raise config_lib.ConfigError("vmap_cpu_groups.py times the tutorial CNN in its CHWN blocks without "
                                     "augmentation or --ema_decay")


@cli.main_guard
@cli.main_guard
def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    base = cli.config_from_flags()
    _check(base)
    unknown = sorted(set(FLAGS.variants) - set(GROUP_VARIANTS))
    if unknown:
        raise config_lib.ConfigError(f"--variants={','.join(unknown)}: use {', '.join(GROUP_VARIANTS)}")
    dataset = data.load(base)
    bs, steps, total = base.batch_size, FLAGS.steps, 100_000
    n = bs * steps
    images, labels = jnp.asarray(dataset.train_images[:n]), jnp.asarray(dataset.train_labels[:n])
    order = jnp.asarray(data.epoch_permutation(base.seed, 0, n))
    key, loop = program.program_key(base), "scan"
    configs = [config_lib.replace(base, learning_rate=base.learning_rate * LR_FACTORS[i % 4]) for i in range(8)]
    stacked = lambda r: state_lib.stack([state_lib.create(c, optim.make_optimizer(c, total))   # noqa: E731
                                         for c in configs[:r]])
    optimizer, single = program.compiled_runner(key, total, loop)
    vmapped = program.compiled_group_runner(key, total, loop)
    groups = {v: step_lib.make_runner(key, make_group_step(key, optim.make_optimizer(key, total), v), loop)
              for v in FLAGS.variants}

    def timed(runner, state, order_):
        box = [state]

        def call(count=steps):
            box[0], metrics = runner(box[0], images, labels, order_, jnp.int32(0), count)
            return jax.block_until_ready(box[0]), metrics
        return call

    counts = [int(r) for r in FLAGS.runs]
    calls: dict[str, tuple[Callable, int]] = {
        "sequential": (timed(single, state_lib.create(configs[0], optimizer), order), 1)}
    for r in counts:
        if FLAGS.batch_rows and steps % r == 0:
            wide = config_lib.replace(base, batch_size=bs * r)
            wide_optimizer, wide_runner = program.compiled_runner(program.program_key(wide), total, loop)
            box = [state_lib.create(wide, wide_optimizer)]

            def wide_call(box=box, runner=wide_runner, count=steps // r):
                box[0] = jax.block_until_ready(runner(box[0], images, labels, order, jnp.int32(0), count)[0])
            calls[f"one run, batch {bs * r}"] = (wide_call, 1)
        calls[f"vmapped R={r}"] = (timed(vmapped, stacked(r), jnp.stack([order] * r)), r)
        reference = timed(vmapped, stacked(r), jnp.stack([order] * r))(5)[0].params
        for v, runner in groups.items():
            calls[f"{v} R={r}"] = (timed(runner, stacked(r), order), r)
            params = timed(runner, stacked(r), order)(5)[0].params
            diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(reference),
                                                                      jax.tree.leaves(params)))
            print(f"{v} R={r}: largest parameter difference from vmapped after 5 steps {diff:.1e}", flush=True)
    for call, _ in calls.values():
        call()   # compile and warm up
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    print(f"{jax.devices()[0].device_kind} ({cpu}, {os.cpu_count()} cores), {base.model} batch {bs} pool "
          f"{base.pool}, {steps} steps per run, load {os.getloadavg()[0]:.2f}", flush=True)
    seen: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(FLAGS.rounds):
        for name, (call, r) in calls.items():
            start = time.perf_counter()
            call()
            seen[name].append(r * n / (time.perf_counter() - start))
        print(f"round {i} (load {os.getloadavg()[0]:.2f}): "
              + ", ".join(f"{name} {v[-1]:.0f}" for name, v in seen.items()), flush=True)
    one = max(seen["sequential"])
    print(f"{'variant':24s} {'img/s all (best)':>16s} {'median':>8s} {'/ sequential':>12s}")
    for name, values in seen.items():
        print(f"{name:24s} {max(values):16.0f} {np.median(values):8.0f} {max(values) / one:11.2f}x")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
