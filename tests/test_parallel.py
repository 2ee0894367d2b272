"""Data parallelism: 4 forced CPU devices and 2 processes (jax.distributed) match one device.

XLA_FLAGS must be set before JAX starts, so the multi-device runs are subprocesses; they
save their final params, which are compared here with a one-device run of the same config.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import numerics
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.data import sources as data
from cnn_jax.engine import optim, parallel, step, train
from cnn_jax.config import Config, ConfigError
from conftest import xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two steps of plain SGD (128 images, batch 64), compared per leaf relative to each leaf's update
# (tests/numerics.py). The rounding differs between 4 devices x 16 and 1 x 64 images (sums in
# another order; Winograd's transforms round differently per batch size) and with the CPU: AVX-512
# here, AVX2 on other x86 machines. Adam is avoided on purpose: it is blind to a gradient's scale
# (a gradient summed instead of averaged over devices would pass) and its normalisation of
# near-zero gradients, over more steps, turns rounding into CPU-dependent 1e-3 differences.
SUBSET = {"train_subset": 128, "test_subset": 100, "batch_size": 64, "conv_impl": "patches",
          "optimizer": "sgd", "learning_rate": 0.1}
WINOGRAD = {"conv_impl": "winograd"}

# Runs in a fresh interpreter: argv = mnist_dir, output prefix, loops, then optional distributed args.
SCRIPT = r"""
import json, os, sys
import numpy as np
from cnn_jax import config as config_lib
from cnn_jax.engine import parallel
mnist_dir, prefix, loops = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
extra = json.loads(os.environ.get("CONFIG_OVERRIDES", "{}"))
if len(sys.argv) > 4:
    extra = dict(coordinator_address=sys.argv[4], num_processes=2, process_id=int(sys.argv[5]))
base = config_lib.replace(config_lib.Config(), data_dir=mnist_dir, **{**SUBSET, **extra})
parallel.initialize(base)
import jax
from cnn_jax.data import sources as data
from cnn_jax.engine import train
dataset = data.load(base)
for loop in loops:
    config = config_lib.replace(base, loop=loop)
    final, history = train.fit(config, dataset)
    params = final.params
    if jax.process_index() == 0:
        np.savez(f"{prefix}_{loop}.npz", **{f"{k}/{n}": np.asarray(v) for k, layer in params.items()
                                            for n, v in layer.items()})
from cnn_jax.engine import state
config = config_lib.replace(base, loop="step")
optimizer, runner = train.compiled_runner(config, len(dataset.train_labels) // base.batch_size, "step")
args = parallel.data_parallel(config).replicate(
    (state.create(config, optimizer), dataset.train_images, dataset.train_labels,
     np.arange(len(dataset.train_labels), dtype=np.int32)))
hlo = runner.lower(*args, np.int32(0)).compile().as_text()
print("gradient all-reduce:", "all-reduce" in hlo)
print("devices", len(jax.devices()), "processes", jax.process_count())
try:
    parallel.data_parallel(config_lib.replace(base, batch_size=30))
except config_lib.ConfigError as e:
    print("error:", e)
""".replace("**SUBSET", "**" + repr(SUBSET))


def _run(args, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _config(mnist_dir, loop, overrides=None):
    return config_lib.replace(Config(), data_dir=mnist_dir, loop=loop, **{**SUBSET, **(overrides or {})})


def _flat(params):
    return {f"{k}/{n}": np.asarray(v) for k, layer in params.items() for n, v in layer.items()}


def _one_device_params(mnist_dir, loop, overrides=None):
    config = _config(mnist_dir, loop, overrides)
    return _flat(train.fit(config, data.load(config))[0].params)


def _start(mnist_dir, overrides=None):
    """The params every run here starts from (the init of seed 0)."""
    config = _config(mnist_dir, "scan", overrides)
    return _flat(model.init(jax.random.key(config.seed), config)[0])


def _assert_params_match(path, expected, start):
    got = np.load(path)
    assert sorted(got.files) == sorted(expected)
    numerics.assert_updates_close(dict(got), expected, start, what=str(path))


@pytest.fixture(scope="module")
def one_device(mnist_dir):
    assert len(jax.devices()) == 1
    return {loop: _one_device_params(mnist_dir, loop) for loop in ("step", "scan")}


@pytest.mark.slow
def test_four_forced_cpu_devices_match_one_device(mnist_dir, one_device, tmp_path):
    proc = _run([mnist_dir, str(tmp_path / "four"), "step,scan"],
                {"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4")})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "data parallel over 4 cpu devices (1 process)" in out
    assert "devices 4 processes 1" in out
    assert "gradient all-reduce: True" in out   # the batch really is split, not replicated
    assert "error: --batch_size=30 does not split evenly over the 4 devices; use a multiple of 4" in out
    for loop in ("step", "scan"):
        _assert_params_match(tmp_path / f"four_{loop}.npz", one_device[loop], _start(mnist_dir))


@pytest.mark.slow
def test_four_forced_cpu_devices_match_one_device_with_winograd(mnist_dir, tmp_path):
    proc = _run([mnist_dir, str(tmp_path / "four"), "scan"],
                {"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=4"),
                 "CONFIG_OVERRIDES": json.dumps(WINOGRAD)})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "strategy: conv=winograd" in out and "data parallel over 4 cpu devices" in out
    _assert_params_match(tmp_path / "four_scan.npz", _one_device_params(mnist_dir, "scan", WINOGRAD),
                         _start(mnist_dir, WINOGRAD))


@pytest.mark.slow
def test_two_processes_through_jax_distributed_match_one_device(mnist_dir, one_device, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    address = f"localhost:{port}"
    procs = [_run([mnist_dir, str(tmp_path / "two"), "step", address, str(i)]) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "data parallel over 2 cpu devices (2 processes)" in out
    _assert_params_match(tmp_path / "two_step.npz", one_device["step"], _start(mnist_dir))


def _scaled_loss(factor):
    loss_fn = step.loss_fn
    return lambda *args: (lambda loss, metrics: (factor * loss, metrics))(*loss_fn(*args))


def _first_shard_twice(images, labels, order, step, batch_size):
    """The batch with its second quarter replaced by its first: device 1 given device 0's shard."""
    idx = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size, axis=-1)
    quarter = batch_size // 4
    idx = jax.numpy.concatenate([idx[:quarter], idx[:quarter], idx[2 * quarter:]])
    return jax.numpy.take(images, idx, axis=0), jax.numpy.take(labels, idx, axis=0)


PLANTED = {   # what a wrong device split would compute, on one device
    "gradient summed over 4 devices, not averaged": ("loss_fn", lambda: _scaled_loss(4.0)),
    "gradient scaled by 1.01": ("loss_fn", lambda: _scaled_loss(1.01)),
    "one device's shard duplicated": ("gather_batch", lambda: _first_shard_twice),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_the_comparison_fails_a_planted_device_split_bug(mnist_dir, one_device, monkeypatch, bug):
    """The comparison above is not loose: a run with any of these bugs fails it."""
    name, replacement = PLANTED[bug]
    monkeypatch.setattr(step, name, replacement())
    planted = _one_device_params(mnist_dir, "scan")   # each run builds (and compiles) its own program
    with pytest.raises(AssertionError, match="above"):
        numerics.assert_updates_close(planted, one_device["scan"], _start(mnist_dir), what=bug)


def test_the_comparison_admits_rounding_level_gradient_noise(mnist_dir, one_device, monkeypatch):
    """Updates off by 1e-4 relative (a hundred times float32 rounding of these sums, as another CPU
    might round them) still pass: the tolerance does not depend on this CPU's rounding."""
    monkeypatch.setattr(optim, "apply_updates", numerics.perturb_updates(1e-4))
    noisy = _one_device_params(mnist_dir, "scan")
    assert any(not np.array_equal(noisy[k], one_device["scan"][k]) for k in noisy)
    numerics.assert_updates_close(noisy, one_device["scan"], _start(mnist_dir), what="noisy updates")


def test_one_device_is_a_no_op():
    dp = parallel.data_parallel(Config())
    assert dp.mesh is None and dp.num_devices == 1 and dp.describe() == "1 device"

    def step(*args):
        return args

    assert dp.wrap_step(step) is step
    placed = dp.replicate({"x": np.arange(3.0)})
    assert isinstance(placed["x"], jax.Array) and np.array_equal(placed["x"], np.arange(3.0))


def test_initialize_needs_a_coordinator_address():
    assert parallel.initialize(Config()) is False


@pytest.mark.parametrize("overrides,message", [
    ({"coordinator_address": "localhost"}, "--coordinator_address='localhost' is not allowed: give host:port"),
    ({"num_processes": 0}, "--num_processes=0 is not allowed"),
    ({"num_processes": 2, "process_id": 2}, "--process_id=2 is not allowed: it must be in 0..1"),
    ({"process_id": -1}, "--process_id=-1 is not allowed"),
])
def test_distributed_flags_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        model.validate(config_lib.replace(Config(), **overrides))
