"""Seeds as an axis (cnn_jax/sweep/seeds.py, `experiments/train.py --seeds`): parsing, the summary's
numbers, a tiny in-process run whose seeds train as they do alone, and the command line."""

import dataclasses
import math
import os
import sys

import numpy as np
import pytest

import script_runner
from cnn_jax import config as config_lib
from cnn_jax import sweep
from cnn_jax.config import Config, ConfigError
from cnn_jax.engine import train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = config_lib.replace(Config(), conv_filters=(4,), conv_kernels=(3,), num_fc=16, train_eval="running",
                          eval_batch_size=200)


@pytest.fixture(scope="module")
def tiny(mnist):
    """640 real training images (10 steps of 64) and 200 real test images."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:640], train_labels=mnist.train_labels[:640],
                               test_images=mnist.test_images[:200], test_labels=mnist.test_labels[:200])


def test_seeds_parse_as_ranges_and_lists():
    assert sweep.parse_seeds("0-9") == tuple(range(10))
    assert sweep.parse_seeds("0,1,2") == (0, 1, 2)
    assert sweep.parse_seeds("3-5, 9") == (3, 4, 5, 9)
    assert sweep.parse_seeds("7") == (7,)
    for bad in ("", "a", "5-3", "-1", "1,1", "0-2,2", "1;2"):
        with pytest.raises(ConfigError, match=r"^--seeds=.* is not allowed: "):
            sweep.parse_seeds(bad)


def test_the_summary_is_mean_sample_std_min_and_max_of_every_final_metric():
    records = [{"epoch": 0, "step": 9, "moving_loss": 0.5, "test_accuracy": 0.9, "epoch_time": 1.0,
                "images_per_second": 10.0},
               {"epoch": 0, "step": 9, "moving_loss": 0.3, "test_accuracy": 0.8, "epoch_time": 2.0,
                "images_per_second": 20.0},
               {}]   # a diverged seed: left out
    summary = sweep.summarize_seeds([4, 5, 6], records)
    assert [s["metric"] for s in summary] == ["moving_loss", "test_accuracy"]
    acc = summary[1]
    assert acc["mean"] == pytest.approx(0.85) and acc["std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert (acc["min"], acc["max"], acc["seeds"]) == (0.8, 0.9, [4, 5])
    assert sweep.format_summary(summary, 3)[1] == "test_accuracy: mean 0.8500, std 0.0707, min 0.8000, max 0.9000 (2 of 3 seeds)"
    assert math.isnan(sweep.summarize_seeds([0], records[:1])[0]["std"])


def test_each_seed_trains_as_it_does_alone_and_the_summary_is_of_their_finals(tiny):
    lines = []
    finals, summary = sweep.train_seeds(TINY, (0, 1), tiny, print_fn=lines.append, max_parallel=1)
    for seed, final in zip((0, 1), finals):
        _, history = train.fit(config_lib.replace(TINY, seed=seed), tiny, hooks=train.Hooks(print_fn=lambda s: None))
        assert final["test_accuracy"] == history[-1]["test_accuracy"]
        assert final["test_loss"] == history[-1]["test_loss"]
    assert finals[0]["test_loss"] != finals[1]["test_loss"]
    test = next(s for s in summary if s["metric"] == "test_accuracy")
    values = [f["test_accuracy"] for f in finals]
    assert (test["mean"], test["min"], test["max"]) == (pytest.approx(np.mean(values)), min(values), max(values))
    assert lines[0].startswith("seed 0: Epoch 0. Loss:") and lines[1].startswith("seed 1: Epoch 0.")
    assert any(line.startswith("test_accuracy: mean ") for line in lines)


def test_the_command_line_trains_the_seeds_and_prints_their_summary(mnist_dir):
    script = os.path.join(REPO_ROOT, "experiments", "train.py")
    args = [sys.executable, script, f"--data_dir={mnist_dir}", "--train_subset=640", "--test_subset=200",
            "--conv_filters=4", "--conv_kernels=3", "--num_fc=16", "--train_eval=running", "--seeds=0-1"]
    result = script_runner.run(args, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    for seed in (0, 1):
        assert any(line.startswith(f"seed {seed}: Epoch 0. Loss:") for line in out)
        assert any(line.startswith(f"seed {seed}: moving_loss ") for line in out)
    for metric in ("moving_loss", "train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert any(line.startswith(f"{metric}: mean ") and line.endswith("(2 of 2 seeds)") for line in out), metric
    refused = script_runner.run(args + ["--seed=3"], timeout=300)
    assert refused.returncode != 0 and "--seed and --seeds cannot be combined" in refused.stderr
