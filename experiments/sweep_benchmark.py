"""Vectorised (vmapped) against sequential training of N runs that differ only in seed and learning rate.

    # GPU: 16 runs of the tutorial's network, one epoch each
    python experiments/sweep_benchmark.py --preset=tutorial --data_dir=../shared/data/mnist --runs=16
    # CPU: which lowering runs fastest under vmap (steady-state epoch time, no sequential runs)
    python experiments/sweep_benchmark.py --data_dir=../shared/data/mnist --runs=6 --epochs=2 \\
        --train_subset=12800 --sequential=false --variants="conv_impl=patches,lax loop=step,scan"

Run i has seed i and learning rate `learning_rate * LR_FACTORS[i % 4]`. Both paths run in
this process on the same loaded data: `sequential` is `train.fit` once per run (each run
compiles its own program, as separate processes would), `vectorised` is
`cnn_jax.sweep.train_group` on groups of up to --max_parallel runs. Times are wall clock,
compile included; the last epoch's time shows the steady state. Output: a table on stdout
and, with --output, JSON.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags

from cnn_jax import cli, model, sweep

from cnn_jax.data import sources as data

from cnn_jax.engine import train
from cnn_jax import config as config_lib
from cnn_jax.rundir import workdir as workdir_lib

cli.define_config_flags()
flags.DEFINE_integer("runs", 16, "Number of runs.")
flags.DEFINE_integer("max_parallel", 0, "Most runs per vmapped group (0: all runs in one group).")
flags.DEFINE_boolean("sequential", True, "Also time the runs one after another.")
flags.DEFINE_string("variants", "", "Grid of execution settings to time the vectorised path under, in "
                    "--sweep syntax, e.g. \"conv_impl=patches,lax loop=step,scan\" (empty: the flags as given).")
flags.DEFINE_string("output", "", "Also write the figures to this JSON file.")
FLAGS = flags.FLAGS
LR_FACTORS = (1.0, 0.5, 2.0, 0.25)


def run_configs(base: config_lib.Config, runs: int) -> list[config_lib.Config]:
    return [config_lib.replace(base, seed=i, learning_rate=base.learning_rate * LR_FACTORS[i % 4])
            for i in range(runs)]


def time_vectorised(configs, dataset) -> dict:
    size = FLAGS.max_parallel or len(configs)
    start = time.perf_counter()
    last_epoch = 0.0
    accuracies = []
    for i in range(0, len(configs), size):
        result = sweep.train_group(configs[i:i + size], dataset)
        last_epoch += max((h[-1]["epoch_time"] for h in result.histories if h), default=0.0)
        accuracies += [h[-1]["test_accuracy"] if h else None for h in result.histories]
    return {"seconds": time.perf_counter() - start, "last_epoch_seconds": last_epoch,
            "test_accuracy": accuracies}


def time_sequential(configs, dataset) -> dict:
    start = time.perf_counter()
    last_epoch = 0.0
    accuracies = []
    for config in configs:
        try:
            history = train.fit(config, dataset)[1]
            last_epoch += history[-1]["epoch_time"]
            accuracies.append(history[-1]["test_accuracy"])
        except FloatingPointError:
            accuracies.append(None)
    return {"seconds": time.perf_counter() - start, "last_epoch_seconds": last_epoch,
            "test_accuracy": accuracies}


@cli.main_guard
def main(argv):
    del argv
    base = cli.config_from_flags()
    dataset = data.load(base)
    images = len(dataset.train_labels) // base.batch_size * base.batch_size * base.epochs * FLAGS.runs
    print(f"{FLAGS.runs} runs x {base.epochs} epoch(s) x {len(dataset.train_labels)} images on "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}), load {os.getloadavg()[0]:.2f}",
          flush=True)
    variants = (sweep.grid_settings(sweep.parse_spec(FLAGS.variants)) if FLAGS.variants else [{}])
    results = {"runs": FLAGS.runs, "epochs": base.epochs, "device": jax.devices()[0].device_kind,
               "load_before": os.getloadavg()[0], "vectorised": {}}
    for variant in variants:
        config = model.validate(config_lib.replace(base, **variant))
        name = sweep.run_name(variant) if variant else "vectorised"
        results["vectorised"][name] = time_vectorised(run_configs(config, FLAGS.runs), dataset)
        r = results["vectorised"][name]
        print(f"{name:40s} {r['seconds']:8.1f} s  ({images / r['seconds']:.0f} img/s over all runs; "
              f"last epoch {r['last_epoch_seconds']:.1f} s)", flush=True)
    if FLAGS.sequential:
        r = results["sequential"] = time_sequential(run_configs(base, FLAGS.runs), dataset)
        print(f"{'sequential (train.fit per run)':40s} {r['seconds']:8.1f} s  ({images / r['seconds']:.0f} img/s "
              f"over all runs; last epochs {r['last_epoch_seconds']:.1f} s)", flush=True)
        best = min(v["seconds"] for v in results["vectorised"].values())
        print(f"speed-up of vectorised over sequential: {r['seconds'] / best:.2f}x")
    results["load_after"] = os.getloadavg()[0]
    if FLAGS.output:
        workdir_lib.atomic_write_text(FLAGS.output, json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
