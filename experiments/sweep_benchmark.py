"""R runs that differ only in seed and learning rate, trained three ways, for R = 1, 2, 4, 8:

- vmapped: one program over a leading run axis (`sweep.train_group` on all R configs);
- one after another in this process (`sweep.train_group` on each config alone: each run trains
  the program `experiments/train.py` trains, compiled once and reused);
- separate processes: `experiments/train.py` started once per run, from process start to exit.

    python experiments/sweep_benchmark.py --data_dir=../shared/data/mnist --train_subset=16384 \\
        --test_subset=1024 --epochs=2 --runs=1,2,4,8
    python experiments/sweep_benchmark.py --preset=vgg --data_dir=../shared/data/mnist \\
        --train_subset=4096 --test_subset=1024 --epochs=1 --runs=1,2,4 --modes=vmapped,sequential

Run i has seed i and learning rate `learning_rate * LR_FACTORS[i % 4]`. For each mode and R it
prints the wall time (compiling included), images per second per run and together over the whole
wall time, the steady-state images per second together (the last epoch), and whether each run's
test accuracy equals the same run's alone. Output: a table on stdout and, with --output, JSON.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import jax
from absl import app, flags

from cnn_jax import cli, sweep
from cnn_jax import config as config_lib
from cnn_jax.data import sources as data
from cnn_jax.rundir import workdir as workdir_lib

cli.define_config_flags()
flags.DEFINE_list("runs", ["1", "2", "4", "8"], "Numbers of runs R to time.")
flags.DEFINE_list("modes", ["vmapped", "sequential", "processes"], "Which ways to train them.")
flags.DEFINE_string("output", "", "Also write the figures to this JSON file.")
FLAGS = flags.FLAGS
LR_FACTORS = (1.0, 0.5, 2.0, 0.25)
MODES = ("vmapped", "sequential", "processes")


def run_configs(base: config_lib.Config, runs: int) -> list[config_lib.Config]:
    return [config_lib.replace(base, seed=i, learning_rate=base.learning_rate * LR_FACTORS[i % 4])
            for i in range(runs)]


def _quiet(*args) -> None:
    del args


def in_process(configs: list[config_lib.Config], dataset: data.Dataset, together: bool) -> dict:
    """Train `configs` as one vmapped group (`together`) or one group of one after another."""
    start = time.perf_counter()
    groups = [configs] if together else [[c] for c in configs]
    histories = []
    for group in groups:
        histories += sweep.train_group(group, dataset).histories
    last = [h[-1] for h in histories if h]
    last_epoch = max(r["epoch_time"] for r in last) if together else sum(r["epoch_time"] for r in last)
    return {"seconds": time.perf_counter() - start, "last_epoch_seconds": last_epoch,
            "test_accuracy": [h[-1]["test_accuracy"] if h else None for h in histories]}


def processes(configs: list[config_lib.Config]) -> dict:
    """`experiments/train.py` once per run, one after another, from process start to exit."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    start, accuracies = time.perf_counter(), []
    for config in configs:
        defaults = config_lib.Config()
        args = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else str(v).lower() if isinstance(v, bool) else v}"
                for k, v in vars(config).items() if v != getattr(defaults, k)]
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True)
        line = [x for x in done.stdout.splitlines() if x.startswith(f"Epoch {config.epochs - 1}.")][-1]
        accuracies.append(float(line.split("Test_acc ")[1].split(",")[0]))
    return {"seconds": time.perf_counter() - start, "last_epoch_seconds": None, "test_accuracy": accuracies}


def _row(mode: str, runs: int, result: dict, images_per_run: int, alone: list) -> str:
    total = images_per_run * runs
    steady = (f"{images_per_run // result['epochs'] * runs / result['last_epoch_seconds']:8.0f}"
              if result.get("last_epoch_seconds") else "       -")
    shown = lambda accuracies: [None if a is None else round(a, 4) for a in accuracies]   # noqa: E731 - as printed
    same = "-" if not alone else ("yes" if shown(result["test_accuracy"]) == shown(alone[:runs]) else "no")
    return (f"{mode:10s} {runs:3d} {result['seconds']:9.1f} {total / result['seconds'] / runs:10.0f} "
            f"{total / result['seconds']:10.0f} {steady} {same:>6s}")


@cli.main_guard
def main(argv):
    del argv
    base = cli.config_from_flags()
    unknown = sorted(set(FLAGS.modes) - set(MODES))
    if unknown:
        raise config_lib.ConfigError(f"--modes={','.join(unknown)} is not allowed: use {', '.join(MODES)}")
    counts = [int(r) for r in FLAGS.runs]
    dataset = data.load(base)
    images_per_run = len(dataset.train_labels) // base.batch_size * base.batch_size * base.epochs
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}; {cpu}, {os.cpu_count()} cores), "
          f"{base.model} x {base.epochs} epoch(s) x {len(dataset.train_labels)} images, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'mode':10s} {'R':>3s} {'wall s':>9s} {'img/s/run':>10s} {'img/s all':>10s} {'steady':>8s} "
          f"{'same digits as alone':>6s}", flush=True)
    results = {"device": jax.devices()[0].device_kind, "cpu": cpu, "config": config_lib.to_dict(base), "rows": []}
    alone: list = []
    for runs in counts:
        configs = run_configs(base, runs)
        for mode in sorted(FLAGS.modes, key=lambda m: m != "sequential"):   # the runs alone first
            if mode == "processes":
                result = processes(configs)
            else:
                result = in_process(configs, dataset, together=mode == "vmapped")
            result.update(mode=mode, runs=runs, epochs=base.epochs)
            if mode == "sequential":
                alone = result["test_accuracy"]
            results["rows"].append(result)
            print(_row(mode, runs, result, images_per_run, alone if mode != "sequential" else []), flush=True)
    if FLAGS.output:
        workdir_lib.atomic_write_text(FLAGS.output, json.dumps(results, indent=2))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
