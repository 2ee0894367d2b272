"""Seeds as a first-class axis: one config trained on several seeds and its final metrics summarised
(mean, std, min, max), as `experiments/train.py --seeds=0-9` does.

The seeds' configs differ only in `seed`, a per-run field, so they form one sweep group
(`group.train_group`): on CPU trained one after another, each the program `experiments/train.py`
trains alone (the same digits as a single run), vmapped where that wins (`memory.default_max_parallel`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import numpy as np

from cnn_jax import config as config_lib
from cnn_jax.config import Config, ConfigError
from cnn_jax.data import sources as data_lib
from cnn_jax.engine.runlog import format_epoch
from cnn_jax.sweep.group import train_group
from cnn_jax.sweep.memory import default_max_parallel

# The keys of an epoch record that are not metrics of the model (where and how fast it ran).
NOT_METRICS = ("epoch", "step", "epoch_time", "images_per_second")


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0-9`, `0,1,2` or a mix (`0-3,7`) as the seeds in order; a repeated, negative or malformed
    entry is a one-line ConfigError."""
    seeds: list[int] = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ConfigError(f"--seeds={config_lib.shown(text)} is not allowed: give seeds as a range or a list, "
                              "e.g. 0-9 or 0,1,2")
        seeds += range(int(match[1]), int(match[2] or match[1]) + 1)
    if len(set(seeds)) != len(seeds) or any(s > config_lib.MAX_INT for s in seeds):
        raise ConfigError(f"--seeds={config_lib.shown(text)} is not allowed: each seed once, each at most "
                          f"{config_lib.MAX_INT}")
    return tuple(seeds)


def summarize_seeds(seeds: Sequence[int], records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every metric of the seeds' final epoch records (losses, accuracies: not `NOT_METRICS`):
    {"metric", "mean", "std" (sample std, ddof 1; nan for one seed), "min", "max", "seeds"}, in the
    records' key order; a seed without a record (it diverged) is left out of the numbers."""
    kept = [(seed, r) for seed, r in zip(seeds, records) if r]
    names = [k for k in (kept[0][1] if kept else {}) if k not in NOT_METRICS]
    out = []
    for name in names:
        values = np.array([r[name] for _, r in kept], np.float64)
        out.append({"metric": name, "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                    "min": float(values.min()), "max": float(values.max()), "seeds": [s for s, _ in kept]})
    return out


def format_summary(summary: Sequence[dict[str, Any]], total: int) -> list[str]:
    """One line per metric: `test_accuracy: mean 0.9831, std 0.0012, min 0.9815, max 0.9850 (10 seeds)`."""
    return [f"{s['metric']}: mean {s['mean']:.4f}, std {s['std']:.4f}, min {s['min']:.4f}, max {s['max']:.4f} "
            f"({len(s['seeds'])} of {total} seeds)" for s in summary]


def train_seeds(config: Config, seeds: Sequence[int], dataset: data_lib.Dataset,
                print_fn: Callable[[str], None] = print,
                max_parallel: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train `config` on each of `seeds` as sweep groups of at most `max_parallel` runs (default:
    `default_max_parallel`, one at a time on CPU); print each seed's epoch lines, its final line
    and the summary; return (each seed's final epoch record, {} where it diverged; the summary)."""
    configs = [config_lib.replace(config, seed=seed) for seed in seeds]
    size = max(1, max_parallel or default_max_parallel(config))
    finals: list[dict[str, Any]] = []
    programs: dict[tuple, Any] = {}   # compiled once, reused by every chunk of seeds
    for first in range(0, len(configs), size):
        chunk = configs[first:first + size]
        result = train_group(chunk, dataset, on_epoch=lambda r, record, chunk=chunk: print_fn(
            f"seed {chunk[r].seed}: {format_epoch(record)}"), programs=programs)
        for c, history, diverged in zip(chunk, result.histories, result.diverged):
            if diverged:
                print_fn(f"seed {c.seed}: diverged: {diverged}")
            finals.append(history[-1] if history and not diverged else {})
    for seed, record in zip(seeds, finals):
        if record:
            print_fn(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in NOT_METRICS))
    summary = summarize_seeds(seeds, finals)
    for line in format_summary(summary, len(seeds)):
        print_fn(line)
    return finals, summary
