"""The memory a vmapped sweep group really uses, against `sweep.run_memory_bytes`'s estimate.

    python experiments/measure_group_memory.py --data_dir=../shared/data/mnist --train_subset=1280 \\
        --epochs=1 --group_sizes=1,4 --nocompilation_cache

For each group size K a fresh process loads the data, trains K runs (seeds 0..K-1 of the
flags' config) with `sweep.train_group` once to compile its programs, resets its peak resident
memory (`/proc/self/clear_refs`, Linux), trains them again and reports the peak growth over the
resident memory before (training and evaluating; compiling, a cost of the group that the first
call pays, is left out). The growth per run is the difference between two group sizes
over the difference in runs, so what every group holds once (compiled code, the dataset on the
device) cancels out. Linux only.
"""

from __future__ import annotations

import re
import subprocess
import sys

from absl import app, flags

from cnn_jax import cli, model, sweep
from cnn_jax import config as config_lib
from cnn_jax.config import ConfigError
from cnn_jax.data import sources as data

cli.define_config_flags()
flags.DEFINE_list("group_sizes", ["1", "4"], "Group sizes to measure, each in its own process (at least two).")
flags.DEFINE_integer("group_size", 0, "Measure one group of this size in this process (what each child runs).")
FLAGS = flags.FLAGS
MIB = 2 ** 20


def memory_kib() -> dict[str, int]:
    """This process's VmRSS and VmHWM (peak) in KiB."""
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) for line in f if line.startswith(("VmRSS", "VmHWM"))}


def measure_group(base: config_lib.Config, size: int) -> int:
    """Peak resident growth in bytes of training a group of `size` runs of `base`, compiled before."""
    dataset = data.load(base)
    configs = [config_lib.replace(base, seed=base.seed + i) for i in range(size)]
    sweep.train_group(configs, dataset)   # compiles the group's programs
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current VmRSS
    before = memory_kib()["VmRSS"]
    sweep.train_group(configs, dataset)
    return (memory_kib()["VmHWM"] - before) * 1024


@cli.main_guard
def main(argv):
    del argv
    base = model.validate(cli.config_from_flags())
    if FLAGS.group_size:
        print(f"GROWTH_BYTES {measure_group(base, FLAGS.group_size)}", flush=True)
        return
    sizes = sorted({int(k) for k in FLAGS.group_sizes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ConfigError(f"--group_sizes={','.join(FLAGS.group_sizes)} is not allowed: give at least two "
                          "different positive sizes, e.g. 1,4")
    growth = {}
    for size in sizes:
        out = subprocess.run([sys.executable, *sys.argv, f"--group_size={size}"], capture_output=True, text=True)
        found = re.findall(r"^GROWTH_BYTES (\d+)$", out.stdout, re.M)
        if out.returncode or not found:
            raise RuntimeError(f"the group of {size} failed (exit {out.returncode}): {out.stderr.strip()[-2000:]}")
        growth[size] = int(found[-1])
    estimate, shared = sweep.run_memory_bytes(base), sweep.shared_memory_bytes(base)
    print(f"model={base.model} batch_size={base.batch_size} eval_batch_size={base.eval_batch_size}: "
          f"estimate {estimate / MIB:.1f} MiB per run + {shared / MIB:.1f} MiB per group")
    print(f"{'runs':>4s} {'growth MiB':>10s} {'per run MiB':>11s} {'estimate / per run':>18s}")
    for size in sizes:
        if size == sizes[0]:
            print(f"{size:4d} {growth[size] / MIB:10.1f}")
            continue
        per_run = (growth[size] - growth[sizes[0]]) / (size - sizes[0])
        ratio = f"{estimate / per_run:.2f}" if per_run > 0 else "n/a"
        print(f"{size:4d} {growth[size] / MIB:10.1f} {per_run / MIB:11.1f} {ratio:>18s}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
