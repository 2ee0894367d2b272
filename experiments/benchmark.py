"""Training and evaluation throughput of cnn_jax against the same network in PyTorch.

    python experiments/benchmark.py --data_dir=../shared/data/mnist --output=bench.json
    python experiments/benchmark.py --batch_sizes=64 --pools=max --repeats=3   # quicker

For each pooling (avg, max) and batch size (64 and a large one) it times the tutorial's network
with the tutorial's SGD (`--preset=tutorial`: N(0, 0.01) init, lr 0.01, summed loss) under every
execution strategy of the codebase (reference lax conv + reduce_window pool, the patches
conv, reshape pooling, NHWC / channel-major layout, one jitted call per batch / a scanned
run of batches) and, when `torch` is installed (requirements-bench.txt), the same network,
init and update in PyTorch, interleaved in rounds so machine load hits all alike. Each
figure is the median over `--repeats` timed repeats after a warm-up; compile time is
reported separately. It also prints evaluation throughput, the achieved GFLOP/s against
this machine's measured f32 matmul peak, and (with real data) the wall time, peak resident
memory and accuracy of full MNIST training runs of `experiments/train.py` in subprocesses,
one per preset and seed, alternated seed by seed with PyTorch's time-to-99% peer
(`experiments/torch_peer.py`: the fast preset's network with PyTorch's own recipe), and the
ratio of their mean wall times from process start to exit, measured side by side.
With `--compute_dtypes=float32,bfloat16` (the default) every JAX row is timed in both compute
dtypes (`name:bf16`: `--compute_dtype=bfloat16`) and PyTorch also under
`torch.autocast(dtype=torch.bfloat16)` (`torch:bf16`), interleaved in the same rounds.
Output: a table on stdout and, with --output, a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from cnn_jax import cli, model
from cnn_jax import config as config_lib
from cnn_jax.config import Config, ConfigError
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import evaluation, optim
from cnn_jax.engine import state as state_lib
from cnn_jax.engine import step as step_lib
from cnn_jax.nn import lowering
from cnn_jax.rundir import workdir as workdir_lib

flags.DEFINE_string("data_dir", "", "MNIST IDX folder (real images); empty: synthetic arrays of MNIST shape.")
flags.DEFINE_list("batch_sizes", ["64", "1024"], "Training batch sizes to time.")
flags.DEFINE_list("pools", ["avg", "max"], "Poolings to time.")
flags.DEFINE_list("strategies", ["default", "default_step", "patches", "reference", "patches_rw", "lax_reshape",
                                 "patches_nhwc"],
                  "JAX strategies to time (see STRATEGIES in this file).")
flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (the median is reported).")
flags.DEFINE_float("repeat_images", 8192, "Images per timed repeat (rounded to whole batches).")
flags.DEFINE_integer("train_images", 60000, "Training set size the batches are gathered from.")
flags.DEFINE_boolean("torch", True, "Also time PyTorch when it is installed.")
flags.DEFINE_boolean("eval", True, "Time evaluation (forward only, batches of eval_batch_size).")
flags.DEFINE_list("runs", ["default", "fast"],
                  "Full training runs of experiments/train.py to time, by preset (needs --data_dir); "
                  "empty: none.")
flags.DEFINE_list("run_seeds", ["0", "1", "2", "3", "4"], "Seeds of each full run (and of the PyTorch peer).")
flags.DEFINE_integer("run_subset", 0, "Full runs train and evaluate on the first N images of each split only "
                     "(0: all; a quick check of the run rows, not a measurement).")
flags.DEFINE_boolean("torch_peer", True, "Alternate the full runs with experiments/torch_peer.py, seed by seed, "
                     "when torch is installed and --torch.")
flags.DEFINE_list("families", ["vgg", "resnet"],
                  "Model families to time besides the tutorial's network, each at its preset (config.PRESETS[name]) "
                  "on the same MNIST-shaped images; empty: none.")
flags.DEFINE_list("family_convs", ["auto", "patches", "lax"],
                  "--conv_impl values each family is timed with, side by side (`auto`: the row named after the "
                  "family; others: `family:conv_impl`), `--loop=auto` resolving as train.py does.")
flags.DEFINE_list("compute_dtypes", ["float32", "bfloat16"],
                  "--compute_dtype values every JAX row is timed with, side by side (bfloat16 rows are named "
                  "`name:bf16`); with bfloat16, PyTorch is timed under torch.autocast(bfloat16) too (`torch:bf16`).")
flags.DEFINE_float("quiet_wait", 60.0, "Before each timed round, wait up to this many seconds for other "
                   "processes to leave the CPUs idle (0: don't wait).")
flags.DEFINE_string("output", "", "Write every figure to this JSON file.")
FLAGS = flags.FLAGS

# name -> (Config overrides, description). "default" is what train.py's `auto` picks here.
STRATEGIES: dict[str, tuple[dict[str, Any], str]] = {
    "default": ({}, "auto (train.py's default)"),
    "default_step": ({"loop": "step"}, "auto lowerings, one jitted call per batch"),
    "patches": ({"conv_impl": "patches"}, "auto, but patches + matmul for every conv (no Winograd)"),
    "reference": ({"conv_impl": "lax", "pool_impl": "reduce_window", "layout": "NHWC", "loop": "step"},
                  "lax conv + reduce_window pool"),
    "patches_rw": ({"conv_impl": "patches", "pool_impl": "reduce_window", "layout": "NHWC",
                    "loop": "step"}, "patches conv + reduce_window pool"),
    "lax_reshape": ({"conv_impl": "lax", "pool_impl": "reshape", "layout": "NHWC", "loop": "step"},
                    "lax conv + reshape pool"),
    "patches_nhwc": ({"conv_impl": "patches", "pool_impl": "reshape", "layout": "NHWC", "loop": "step"},
                     "patches conv + reshape pool, NHWC"),
    "patches_chwn": ({"conv_impl": "patches", "pool_impl": "reshape", "layout": "CHWN", "loop": "step"},
                     "patches conv + reshape pool, CHWN"),
}


# --- What is timed --------------------------------------------------------------------------

def model_flops(config: Config) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per training image (multiply-add = 2): the model's."""
    return model.flops(config)


@dataclasses.dataclass
class Candidate:
    """One thing to time: `run()` trains `images_per_run` images and blocks until done."""

    name: str
    framework: str
    description: str
    run: Callable[[], None]
    images_per_run: int
    compile_s: float = 0.0
    times: list[float] = dataclasses.field(default_factory=list)

    def result(self) -> dict[str, Any]:
        ips = [self.images_per_run / t for t in self.times]
        return {"name": self.name, "framework": self.framework, "description": self.description,
                "images_per_second": float(np.median(ips)), "repeats_images_per_second": ips,
                "compile_s": self.compile_s}


BF16_SUFFIX = ":bf16"


def dtype_name(name: str, compute_dtype: str) -> str:
    """A row's name in `compute_dtype`: `name` for float32, `name:bf16` for bfloat16."""
    return name if compute_dtype == "float32" else name + BF16_SUFFIX


def jax_candidate(name: str, config: Config, images: jax.Array, labels: jax.Array,
                  steps: int) -> Candidate:
    """The train.py runner for `config`, `steps` batches per run, through the real step code."""
    strategy = model.strategy(config)
    optimizer = optim.make_optimizer(config, steps)
    state = [state_lib.create(config, optimizer)]
    train_step = step_lib.make_train_step(config, optimizer)
    order = jnp.asarray(data_lib.epoch_permutation(config.seed, 0, len(labels)))
    per_epoch = len(labels) // config.batch_size
    position = [0]

    if strategy.loop == "scan":
        runner = step_lib.make_scan_runner(config, train_step)

        def run() -> None:
            first = position[0] % (per_epoch - steps + 1)
            state[0], metrics = runner(state[0], images, labels, order, np.int32(first), steps)
            position[0] += steps
            jax.block_until_ready((state, metrics))
    else:
        runner = step_lib.make_step_runner(config, train_step)

        def run() -> None:
            for _ in range(steps):
                state[0], metrics = runner(state[0], images, labels, order,
                                           np.int32(position[0] % per_epoch))
                position[0] += 1
            jax.block_until_ready((state, metrics))

    start = time.perf_counter()
    run()   # compiles, then runs once
    base = name.removesuffix(BF16_SUFFIX)
    candidate = Candidate(name, "jax", f"{STRATEGIES.get(base, ({}, base))[1]} [{strategy.describe()}]",
                          run, steps * config.batch_size)
    candidate.compile_s = time.perf_counter() - start
    return candidate


def torch_net(config: Config):
    """The tutorial's network in PyTorch (NCHW; experiments/torch_peer.py's `make_net`), init
    N(0, weight_scale) for every weight and bias."""
    import torch
    import torch_peer   # experiments/, beside this script

    net = torch_peer.make_net(pool=config.pool, conv_filters=config.conv_filters,
                              conv_kernels=config.conv_kernels, pool_window=config.pool_window,
                              pool_stride=config.pool_stride,
                              num_fc=config.num_fc, num_classes=config.num_classes,
                              input_shape=config.input_shape, conv_stride=config.conv_stride)
    torch.manual_seed(config.seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, config.weight_scale)
    return net


def torch_device() -> str:
    """PyTorch runs where JAX does: CUDA when JAX is on a GPU and torch sees one, else the CPU."""
    import torch
    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_timed(run: Callable[[], None], images_per_run: int, device: str, autocast: bool = False) -> Candidate:
    """A PyTorch candidate for `run`, run once first (its `compile_s`: the first call's time);
    `autocast`: the run's forward passes are under torch.autocast(bfloat16) (`torch:bf16`)."""
    import torch

    start = time.perf_counter()
    run()
    where = "CUDA" if device == "cuda" else f"{torch.get_num_threads()} threads"
    where += ", autocast bfloat16" if autocast else ""
    candidate = Candidate(dtype_name("torch", "bfloat16" if autocast else "float32"), "torch",
                          f"PyTorch {torch.__version__} ({where})", run, images_per_run)
    candidate.compile_s = time.perf_counter() - start
    return candidate


def autocast(device: str, enabled: bool):
    """torch.autocast(bfloat16) on `device` when `enabled`, else a no-op context."""
    import torch
    return torch.autocast(device, dtype=torch.bfloat16, enabled=enabled)


def torch_candidate(config: Config, images: np.ndarray, labels: np.ndarray, steps: int,
                    bf16: bool = False) -> Candidate:
    """The same network, init and update (p -= lr * grad of the summed loss) in PyTorch; `bf16`:
    its forward pass and loss under torch.autocast(bfloat16), as PyTorch's mixed precision runs."""
    import torch
    import torch.nn.functional as F

    device = torch_device()
    net = torch_net(config).to(device)
    x_all = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    y_all = torch.from_numpy(labels.astype(np.int64)).to(device)
    order = torch.from_numpy(data_lib.epoch_permutation(config.seed, 0, len(labels)).astype(np.int64))
    order = order.to(device)
    per_epoch, bs, lr = len(labels) // config.batch_size, config.batch_size, config.learning_rate
    position = [0]
    reduction = config.loss_reduction

    def run() -> None:
        for _ in range(steps):
            idx = order[(position[0] % per_epoch) * bs:(position[0] % per_epoch + 1) * bs]
            position[0] += 1
            with autocast(device, bf16):
                loss = F.cross_entropy(net(x_all[idx]), y_all[idx], reduction=reduction)
            net.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in net.parameters():
                    p.sub_(lr * p.grad)
        if device == "cuda":
            torch.cuda.synchronize()

    return torch_timed(run, steps * bs, device, bf16)


def torch_family_candidate(config: Config, images: np.ndarray, labels: np.ndarray, steps: int,
                           bf16: bool = False) -> Candidate:
    """A model family's network in PyTorch (experiments/torch_peer.py's make_vgg / make_resnet),
    trained as the family's preset trains: Adam at its learning rate (constant: a schedule costs
    nothing per step), batch norm in training mode, dropout, and the preset's random shifts of up
    to `augment_shift` pixels per image (pad, then gather each image's window); `bf16`: forward and
    loss under torch.autocast(bfloat16)."""
    import torch
    import torch.nn.functional as F
    import torch_peer   # experiments/, beside this script

    device = torch_device()
    make = {"vgg": torch_peer.make_vgg, "resnet": torch_peer.make_resnet}[config.model]
    torch.manual_seed(config.seed)
    net = make(config.widths, config.depth, config.dropout, config.bn_momentum, config.num_classes,
               tuple(config.input_shape)).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    x_all = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    y_all = torch.from_numpy(labels.astype(np.int64)).to(device)
    order = torch.from_numpy(data_lib.epoch_permutation(config.seed, 0, len(labels)).astype(np.int64)).to(device)
    per_epoch, bs, shift = len(labels) // config.batch_size, config.batch_size, config.augment_shift
    height, width = x_all.shape[2:]
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    position = [0]

    def shifted(x: torch.Tensor) -> torch.Tensor:
        if not shift:
            return x
        padded = F.pad(x, (shift, shift, shift, shift))
        offsets = torch.randint(0, 2 * shift + 1, (len(x), 2), generator=generator, device=device)
        r = (offsets[:, 0, None] + rows)[:, :, None]                # (N, H, 1)
        c = (offsets[:, 1, None] + cols)[:, None, :]                # (N, 1, W)
        n = torch.arange(len(x), device=device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[n, r, c].permute(0, 3, 1, 2)

    def run() -> None:
        for _ in range(steps):
            idx = order[(position[0] % per_epoch) * bs:(position[0] % per_epoch + 1) * bs]
            position[0] += 1
            with autocast(device, bf16):
                loss = F.cross_entropy(net(shifted(x_all[idx])), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return torch_timed(run, steps * bs, device, bf16)


def busy_fraction(seconds: float = 0.3) -> float:
    """Fraction of all CPUs busy over `seconds` (Linux /proc/stat; 0 elsewhere), this
    process included (it sleeps meanwhile)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]        # idle + iowait
        return sum(values) - idle, sum(values)
    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except OSError:
        return 0.0
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_for_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Sleep until other processes use under `threshold` of the CPUs, or `max_wait` seconds
    pass; return the last busy fraction seen (the machine is shared: see the table's header)."""
    deadline = time.monotonic() + max_wait
    busy = busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(1.0)
        busy = busy_fraction()
    return busy


def time_interleaved(candidates: list[Candidate], repeats: int, quiet_wait: float = 0.0) -> list[float]:
    """One untimed warm-up run each, then `repeats` rounds timing every candidate once per round,
    each round started when the machine is quiet (up to `quiet_wait` s); returns each round's
    busy fraction before it started."""
    for c in candidates:
        c.run()
    busy = []
    for _ in range(repeats):
        busy.append(wait_for_quiet(quiet_wait) if quiet_wait > 0 else busy_fraction(0.1))
        for c in candidates:
            start = time.perf_counter()
            c.run()
            c.times.append(time.perf_counter() - start)
    return busy


def eval_throughput(config: Config, images: jax.Array, labels: jax.Array, repeats: int) -> dict[str, Any]:
    """Images/s of `evaluation.evaluate` (forward passes in batches of eval_batch_size)."""
    params, model_state = model.init(jax.random.key(config.seed), config)
    start = time.perf_counter()
    evaluation.evaluate(params, model_state, images, labels, config)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        evaluation.evaluate(params, model_state, images, labels, config)
        times.append(time.perf_counter() - start)
    return {"images_per_second": len(labels) / float(np.median(times)), "compile_s": compile_s}


def torch_eval_throughput(config: Config, images: np.ndarray, repeats: int) -> float:
    import torch

    device = torch_device()
    net = torch_net(config).to(device)
    x_all = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    bs = config.eval_batch_size

    def run() -> None:
        with torch.no_grad():
            for start in range(0, len(x_all), bs):
                net(x_all[start:start + bs]).argmax(-1)
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return len(x_all) / float(np.median(times))


def matmul_peak_gflops(size: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Best observed GFLOP/s of one jitted size x size matmul on the default device, its inputs in
    `dtype` and accumulated in float32 (bfloat16: the ceiling the bfloat16 rows work under)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best / 1e9


# Runs a script as __main__ and, at exit, prints its peak resident memory (VmHWM, KiB).
_PEAK_RSS_WRAPPER = """
import atexit, runpy, sys
def _peak():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                print("PEAK_RSS_KIB", line.split()[1], flush=True)
    except OSError:
        pass
atexit.register(_peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def timed_process(args: list[str]) -> dict[str, Any]:
    """Run the script `args[0]` with flags `args[1:]` in a subprocess: wall time from process start
    to exit, its peak RSS, exit status, the last `Test_acc` it printed and its output."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _PEAK_RSS_WRAPPER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    # The child's own high-water mark. (wait4's ru_maxrss would also count this parent's
    # resident memory, which Linux carries over to the child through fork and exec.)
    peak = re.findall(r"^PEAK_RSS_KIB (\d+)$", out, re.M)
    maxrss_kib = int(peak[-1]) if peak else usage.ru_maxrss
    accuracies = [float(a) for a in re.findall(r"Test_acc ([0-9.]+)", out)]
    return {"command": " ".join(args), "exit_status": proc.returncode, "wall_s": wall,
            "peak_rss_mib": maxrss_kib / 1024, "test_accuracy": accuracies[-1] if accuracies else None,
            "output": out}


def subset_args(subset: int) -> tuple[str, ...]:
    return (f"--train_subset={subset}", f"--test_subset={subset}") if subset else ()


def training_run(preset: str, data_dir: str, extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run `experiments/train.py --preset=...` in a subprocess: wall time, peak RSS, test accuracy,
    the lowering it chose and whether the compilation cache was hit."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    run = timed_process([script, f"--preset={preset}", f"--data_dir={data_dir}", *extra_args])
    out = run.pop("output")
    strategy = re.findall(r"^(?:I\S+ )?.*strategy: (.*)$", out, re.M)
    cache = re.findall(r"^compilation cache (.*?) \(", out, re.M)
    return {"name": f"--preset={preset}", "preset": preset, "framework": "jax", **run,
            "strategy": strategy[0] if strategy else None, "compilation_cache": cache[-1] if cache else None,
            "output_tail": out.strip().splitlines()[-3:]}


def torch_peer_run(data_dir: str, extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run `experiments/torch_peer.py` (its own recipe) in a subprocess: as `training_run`."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py")
    run = timed_process([script, f"--data_dir={data_dir}", *extra_args])
    out = run.pop("output")
    recipe = re.findall(r"^(PyTorch .*)$", out, re.M)
    return {"name": "torch_peer", "preset": None, "framework": "torch", **run,
            "strategy": recipe[0] if recipe else None, "compilation_cache": None,
            "output_tail": out.strip().splitlines()[-3:]}


def summarize_runs(runs: list[dict[str, Any]], target: float = 0.99) -> dict[str, Any]:
    """One row from the runs of one command over seeds: each seed's accuracy and wall time, their
    min and mean, the largest peak RSS, and whether every run exited 0 at >= `target` accuracy."""
    accuracies = [r["test_accuracy"] for r in runs]
    walls = [r["wall_s"] for r in runs]
    known = [a for a in accuracies if a is not None]
    return {"name": runs[0]["name"], "framework": runs[0]["framework"], "seeds": [r["seed"] for r in runs],
            "test_accuracies": accuracies, "wall_s": walls,
            "min_test_accuracy": min(known) if len(known) == len(runs) else None,
            "mean_test_accuracy": float(np.mean(known)) if len(known) == len(runs) else None,
            "mean_wall_s": float(np.mean(walls)), "max_peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "all_reached_target": all(r["exit_status"] == 0 and r["test_accuracy"] is not None
                                      and r["test_accuracy"] >= target for r in runs),
            "target": target}


def time_to_target_ratio(jax_row: dict[str, Any], torch_row: dict[str, Any]) -> float | None:
    """JAX's mean wall time over PyTorch's, when every run of both reached the target; else None."""
    if not (jax_row["all_reached_target"] and torch_row["all_reached_target"]):
        return None
    return jax_row["mean_wall_s"] / torch_row["mean_wall_s"]


def cpu_model() -> str:
    """The CPU's model name, family and model number (Linux /proc/cpuinfo; the platform elsewhere)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


# --- Report ---------------------------------------------------------------------------------

def format_training(groups: list[dict[str, Any]]) -> str:
    """The training rows: one per strategy, per (pool, batch size) group."""
    lines = [f"{'pool':4s} {'batch':>5s} {'strategy':14s} {'img/s':>8s} {'vs torch':>8s} "
             f"{'GFLOP/s':>8s} {'% peak':>6s} {'compile s':>9s}  lowering"]
    for group in groups:
        torch_ips = next((r["images_per_second"] for r in group["results"] if r["framework"] == "torch"),
                         None)
        busy = group.get("busy_before_rounds") or [0.0]
        lines.append(f"(pool={group['pool']}, batch {group['batch_size']}: CPUs busy with other work before "
                     f"the rounds: {', '.join(f'{100 * b:.0f}%' for b in busy)})")
        for r in group["results"]:
            ratio = f"{r['images_per_second'] / torch_ips:.2f}x" if torch_ips else "-"
            lines.append(
                f"{group['pool']:4s} {group['batch_size']:5d} {r['name']:14s} {r['images_per_second']:8.0f} "
                f"{ratio:>8s} {r['gflops']:8.1f} {r['percent_of_peak']:6.1f} {r['compile_s']:9.2f}  "
                f"{r['description']}")
        lines.append("")
    return "\n".join(lines)


def format_families(rows: list[dict[str, Any]]) -> str:
    """The model-family rows: each family at its preset."""
    lines = [f"{'family':14s} {'batch':>5s} {'img/s':>8s} {'torch img/s':>11s} {'vs torch':>8s} {'vs t.bf16':>9s} "
             f"{'MFLOP/img':>9s} {'GFLOP/s':>8s} {'% peak':>6s} {'compile s':>9s}  lowering"]
    for r in rows:
        peer, peer16 = r.get("torch"), r.get("torch_bf16")
        torch_ips = f"{peer['images_per_second']:11.0f}" if peer else f"{'-':>11s}"
        ratio = f"{r['images_per_second'] / peer['images_per_second']:7.2f}x" if peer else f"{'-':>8s}"
        ratio16 = f"{r['images_per_second'] / peer16['images_per_second']:8.2f}x" if peer16 else f"{'-':>9s}"
        lines.append(f"{r['name']:14s} {r['batch_size']:5d} {r['images_per_second']:8.0f} {torch_ips} {ratio} {ratio16} "
                     f"{r['flops_per_image'] / 1e6:9.1f} {r['gflops']:8.1f} {r['percent_of_peak']:6.1f} "
                     f"{r['compile_s']:9.2f}  {r['description']}")
    return "\n".join(lines)


def format_table(report: dict[str, Any]) -> str:
    lines = [f"cnn_jax benchmark: {report['machine']['device']} ({report['machine']['cpu_model']}), "
             f"{report['machine']['cpu_count']} CPUs, "
             f"jax {report['machine']['jax']}, torch {report['machine']['torch'] or 'absent'}",
             f"the tutorial's network and SGD; {report['flops_per_image'] / 1e6:.1f} MFLOP per training image; "
             f"matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s"
             + (f" (bfloat16 inputs: {report['matmul_peak_gflops_bfloat16']:.0f})"
                if report["matmul_peak_gflops_bfloat16"] is not None else "") + f"; data: {report['data']}",
             f"1-min load average at start / end: {report['machine']['load_average_1min']['start']:.1f} / "
             f"{report['machine']['load_average_1min']['end']:.1f} (other processes slow every figure, "
             "PyTorch's most)",
             ""] + ([format_training(report["training"])] if report["training"] else [])
    if report["families"]:
        lines += ["model families at their presets (training, MNIST-shaped images; PyTorch: the same network, "
                  "Adam, shifts and dropout):",
                  format_families(report["families"]), ""]
    if report["evaluation"]:
        lines.append("evaluation (forward only, test set, eval_batch_size per call):")
        for e in report["evaluation"]:
            lines.append(f"  {e['pool']:4s} {e['name']:14s} {e['images_per_second']:9.0f} img/s")
        lines.append("")
    if report["run_rows"]:
        lines += [format_runs(report), ""]
    return "\n".join(lines).rstrip() + "\n"


def format_runs(report: dict[str, Any]) -> str:
    """The full-run rows (one per command, over its seeds) and the time-to-99% ratio."""
    accuracy = lambda a: "-" if a is None else f"{a:.4f}"   # noqa: E731
    lines = [f"full training runs, wall time from process start to exit ({report['machine']['cpu_model']}, "
             f"{report['machine']['cpu_count']} CPUs; data: {report['run_data']}):",
             f"{'run':16s} {'seeds':>9s} {'min acc':>7s} {'mean acc':>8s} {'>=0.99':>6s} {'mean s':>6s} "
             f"{'peak MiB':>8s}  test accuracy and wall s per seed"]
    for row in report["run_rows"]:
        per_seed = ", ".join(f"{s}: {accuracy(a)} {w:.1f}s" for s, a, w in
                             zip(row["seeds"], row["test_accuracies"], row["wall_s"]))
        lines.append(f"{row['name']:16s} {','.join(map(str, row['seeds'])):>9s} "
                     f"{accuracy(row['min_test_accuracy']):>7s} {accuracy(row['mean_test_accuracy']):>8s} "
                     f"{'yes' if row['all_reached_target'] else 'NO':>6s} {row['mean_wall_s']:6.1f} "
                     f"{row['max_peak_rss_mib']:8.0f}  {per_seed}")
    for ratio in report["time_to_99"]:
        figure = "-" if ratio["ratio"] is None else f"{ratio['ratio']:.2f}x"
        lines.append(f"time to 99% (mean wall over the seeds), {ratio['jax']} / {ratio['torch']}: {figure}"
                     + ("" if ratio["ratio"] is not None else " (not every run reached 0.99)"))
    for run in report["runs"]:
        cache = f", compilation cache {run['compilation_cache']}" if run["compilation_cache"] else ""
        lines.append(f"  {run['name']} seed {run['seed']}: CPUs {100 * run['busy_before']:.0f}% busy with other "
                     f"work before it{cache}")
    return "\n".join(lines)


def full_runs(report: dict[str, Any], presets: list[str], seeds: list[int], peer: bool) -> None:
    """Every preset's full run and the PyTorch peer for each seed, alternated seed by seed so
    machine load hits all alike; then one row per command and JAX's time-to-99% ratio to the peer."""
    extra = subset_args(FLAGS.run_subset)
    report["run_data"] = (f"MNIST from {FLAGS.data_dir}" + (f", first {FLAGS.run_subset} images of each split"
                                                           if FLAGS.run_subset else ""))

    def busy() -> float:
        return wait_for_quiet(FLAGS.quiet_wait) if FLAGS.quiet_wait > 0 else busy_fraction()

    for seed in seeds:
        for preset in presets:
            before = busy()
            report["runs"].append({**training_run(preset, FLAGS.data_dir, (f"--seed={seed}", *extra)),
                                   "seed": seed, "busy_before": before})
        if peer:
            before = busy()
            report["runs"].append({**torch_peer_run(FLAGS.data_dir, (f"--seed={seed}", *extra)),
                                   "seed": seed, "busy_before": before})
    names = list(dict.fromkeys(r["name"] for r in report["runs"]))
    report["run_rows"] = [summarize_runs([r for r in report["runs"] if r["name"] == n]) for n in names]
    torch_rows = [row for row in report["run_rows"] if row["framework"] == "torch"]
    for row in report["run_rows"]:
        if row["framework"] == "jax" and torch_rows:
            report["time_to_99"].append({"jax": row["name"], "torch": torch_rows[0]["name"],
                                         "ratio": time_to_target_ratio(row, torch_rows[0])})


def checked_flags() -> list[int]:
    """The batch sizes to time; every flag is checked first, so a bad one costs no benchmark time
    (one-line ConfigError)."""
    try:
        batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    except ValueError:
        raise ConfigError(f"--batch_sizes={','.join(FLAGS.batch_sizes)} is not allowed: give comma-separated "
                          "integers, e.g. 64,1024") from None
    for name in ("repeats", "train_images"):
        if FLAGS[name].value < 1:
            raise ConfigError(f"--{name}={FLAGS[name].value} is not allowed: it must be positive")
    too_big = [b for b in batch_sizes if b > FLAGS.train_images]
    if too_big:
        raise ConfigError(f"--batch_sizes={too_big[0]} is larger than --train_images={FLAGS.train_images}")
    families = {name: name for name in config_lib.PRESETS if config_lib.PRESETS[name].model == name}
    for value in FLAGS.runs:
        config_lib.check_renamed("preset", value, "--runs")
    try:
        [int(s) for s in FLAGS.run_seeds]
    except ValueError:
        raise ConfigError(f"--run_seeds={','.join(FLAGS.run_seeds)} is not allowed: give comma-separated "
                          "integers, e.g. 0,1,2,3,4") from None
    if not FLAGS.run_seeds and any(FLAGS.runs):
        raise ConfigError("--run_seeds is empty: give at least one seed, or --runs= for no full runs")
    if FLAGS.run_subset < 0:
        raise ConfigError(f"--run_subset={FLAGS.run_subset} is not allowed: it must be 0 (all) or positive")
    for name, known in (("strategies", STRATEGIES), ("runs", config_lib.PRESETS), ("families", families),
                        ("family_convs", config_lib.CONV_IMPLS)):
        unknown = [v for v in FLAGS[name].value if v and v not in known]
        if unknown:
            raise ConfigError(f"--{name}={unknown[0]} is not allowed: use one of {', '.join(known)}")
    for value in FLAGS.compute_dtypes:
        config_lib.check_choice("compute_dtypes", value, config_lib.COMPUTE_DTYPES)
        lowering.check_compute_dtype(config_lib.replace(Config(), compute_dtype=value))
    if not FLAGS.compute_dtypes:
        raise ConfigError("--compute_dtypes is empty: give float32, bfloat16 or both")
    for pool in FLAGS.pools:
        for batch_size in batch_sizes:
            model.validate(config_lib.replace(config_lib.PRESETS["tutorial"], pool=pool, batch_size=batch_size))
    folder = os.path.dirname(os.path.abspath(FLAGS.output)) if FLAGS.output else ""
    if folder and not os.path.isdir(folder):
        raise ConfigError(f"--output={FLAGS.output}: folder {folder} does not exist")
    return batch_sizes


@cli.main_guard
def main(argv: list[str]) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    batch_sizes = checked_flags()
    load_before = os.getloadavg()
    base = config_lib.PRESETS["tutorial"]
    try:
        import torch
        torch_version = torch.__version__ if FLAGS.torch else None
    except ImportError:
        torch_version = None
    if FLAGS.data_dir:
        dataset = data_lib.load(config_lib.replace(base, data_dir=FLAGS.data_dir))
        train_x, train_y = dataset.train_images[:FLAGS.train_images], dataset.train_labels[:FLAGS.train_images]
        test_x, test_y = dataset.test_images, dataset.test_labels
        data = f"MNIST from {FLAGS.data_dir}"
    else:
        rng = np.random.default_rng(0)
        train_x = rng.random((FLAGS.train_images, 28, 28, 1), np.float32)
        train_y = rng.integers(0, 10, FLAGS.train_images).astype(np.int32)
        test_x, test_y = train_x[:10000], train_y[:10000]
        data = "synthetic arrays of MNIST shape"
    images, labels = jnp.asarray(train_x), jnp.asarray(train_y)
    forward, total = model_flops(base)
    peak = matmul_peak_gflops()
    bf16_peak = matmul_peak_gflops(dtype="bfloat16") if "bfloat16" in FLAGS.compute_dtypes else None
    report: dict[str, Any] = {
        "machine": {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                    "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "jax": jax.__version__,
                    "torch": torch_version, "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "data": data, "flops_per_image": total, "forward_flops_per_image": forward,
        "matmul_peak_gflops": peak, "matmul_peak_gflops_bfloat16": bf16_peak, "repeats": FLAGS.repeats,
        "training": [], "evaluation": [], "runs": [], "families": [], "run_rows": [], "time_to_99": [],
        "run_data": None,
    }
    for pool in FLAGS.pools:
        for batch_size in batch_sizes:
            config = model.validate(config_lib.replace(base, pool=pool, batch_size=batch_size))
            steps = max(1, round(FLAGS.repeat_images / batch_size))
            steps = min(steps, len(train_y) // batch_size)
            candidates = [jax_candidate(dtype_name(name, dtype),
                                        config_lib.replace(config, **STRATEGIES[name][0], compute_dtype=dtype),
                                        images, labels, steps)
                          for name in FLAGS.strategies for dtype in FLAGS.compute_dtypes]
            if torch_version:
                candidates += [torch_candidate(config, train_x, train_y, steps, bf16=dtype == "bfloat16")
                               for dtype in FLAGS.compute_dtypes]
            busy = time_interleaved(candidates, FLAGS.repeats, FLAGS.quiet_wait)
            results = [c.result() for c in candidates]
            for r in results:
                r["gflops"] = r["images_per_second"] * total / 1e9
                r["percent_of_peak"] = 100.0 * r["gflops"] / peak
            report["training"].append({"pool": pool, "batch_size": batch_size, "steps_per_repeat": steps,
                                       "busy_before_rounds": busy, "results": results})
            print(format_training(report["training"][-1:]), flush=True)
        if FLAGS.eval:
            test_images, test_labels = jnp.asarray(test_x), jnp.asarray(test_y)
            for name in ("default", "reference"):
                config = config_lib.replace(base, pool=pool, **STRATEGIES[name][0])
                report["evaluation"].append({"pool": pool, "name": name, "framework": "jax",
                                             **eval_throughput(config, test_images, test_labels,
                                                               FLAGS.repeats)})
            if torch_version:
                report["evaluation"].append({"pool": pool, "name": "torch", "framework": "torch",
                                             "images_per_second": torch_eval_throughput(
                                                 config_lib.replace(base, pool=pool), test_x,
                                                 FLAGS.repeats)})
    for name in [f for f in FLAGS.families if f]:
        preset = config_lib.PRESETS[name]
        config = model.validate(config_lib.replace(preset, batch_size=min(preset.batch_size, len(train_y))))
        steps = min(max(1, round(FLAGS.repeat_images / config.batch_size)), len(train_y) // config.batch_size)
        convs = [c for c in FLAGS.family_convs if c] or ["auto"]
        candidates = [jax_candidate(dtype_name(name if conv == "auto" else f"{name}:{conv}", dtype),
                                    config_lib.replace(config, conv_impl=conv, compute_dtype=dtype), images, labels,
                                    steps)
                      for conv in convs for dtype in FLAGS.compute_dtypes]
        peers = {dtype: torch_family_candidate(config, train_x, train_y, steps, bf16=dtype == "bfloat16")
                 for dtype in FLAGS.compute_dtypes} if torch_version else {}
        busy = time_interleaved(candidates + list(peers.values()), FLAGS.repeats, FLAGS.quiet_wait)
        for candidate in candidates:
            peer, peer16 = peers.get("float32"), peers.get("bfloat16")
            row = {**candidate.result(), "batch_size": config.batch_size, "flops_per_image": model_flops(config)[1],
                   "busy_before_rounds": busy, "torch": peer.result() if peer else None,
                   "torch_bf16": peer16.result() if peer16 else None}
            row["gflops"] = row["images_per_second"] * row["flops_per_image"] / 1e9
            row["percent_of_peak"] = 100.0 * row["gflops"] / peak
            report["families"].append(row)
        print(format_families(report["families"][-len(candidates):]), flush=True)
    if FLAGS.data_dir:
        full_runs(report, [r for r in FLAGS.runs if r], [int(s) for s in FLAGS.run_seeds],
                  peer=bool(torch_version) and FLAGS.torch_peer)
    report["machine"]["load_average_1min"] = {"start": load_before[0], "end": os.getloadavg()[0]}
    print(format_table(report), end="")
    if FLAGS.output:
        workdir_lib.atomic_write_text(FLAGS.output, json.dumps(report, indent=1))
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
