"""The vgg family (cnn_jax/models/vgg.py): shapes, lowerings, training with batch norm and
dropout, deterministic evaluation, bit-exact resume, vmapped sweeps, and batch norm's global
batch statistics under data parallelism (4 forced CPU devices against 1)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import family_checks as checks
from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.config import Config, ConfigError
from conftest import REPO_ROOT, xla_flags

TINY = config_lib.replace(Config(), model="vgg", widths=(4, 8), depth=1, dropout=0.25, epochs=2, batch_size=32,
                          loop="step", train_eval="running", eval_batch_size=100, log_every=5,
                          learning_rate=0.003)


@pytest.fixture(scope="module")
def small(mnist):
    return checks.small_dataset(mnist)


@pytest.mark.parametrize("input_shape", [(28, 28, 1), (32, 32, 3)])
def test_shapes(input_shape, capsys):
    checks.shapes_match_the_real_ones(config_lib.replace(TINY, depth=2), input_shape, capsys)


def test_config_checks():
    assert model.validate(config_lib.PRESETS["vgg"]).model == "vgg"
    for overrides, message in [
        ({"widths": ()}, "--widths= is not allowed for --model=vgg"),
        ({"widths": (4, 0)}, "--widths=4,0 is not allowed"),
        ({"widths": (4,) * 5}, "pool the 28x28 input below 1x1"),
        ({"depth": 0}, "--depth=0 is not allowed"),
        ({"dropout": 1.0}, r"--dropout=1.0 is not allowed: it must be in \[0, 1\)"),
        ({"bn_momentum": -0.1}, "--bn_momentum=-0.1 is not allowed"),
        ({"conv_impl": "winograd"}, "--conv_impl=winograd is not available for --model=vgg"),
        ({"layout": "CHWN"}, "--layout=CHWN is not available for --model=vgg"),
    ]:
        with pytest.raises(ConfigError, match=message):
            model.validate(config_lib.replace(TINY, **overrides))


def test_flops_count_the_convolutions_and_the_classifier():
    config = config_lib.replace(TINY, widths=(4, 8), depth=1)
    conv1, conv2, output = 2 * 28 * 28 * 9 * 1 * 4, 2 * 14 * 14 * 9 * 4 * 8, 2 * (7 * 7 * 8) * 10
    forward = conv1 + conv2 + output
    assert model.flops(config) == (forward, 3 * forward - conv1)


def test_patches_and_lax_convolutions_agree():
    checks.conv_lowerings_agree(TINY)


def test_evaluation_runs_the_onednn_lowering_training_runs(small, monkeypatch):
    checks.evaluation_runs_the_lowering_training_runs(TINY, small, monkeypatch)


def test_training_evaluation_and_resume(small):
    final = checks.training_moves_state_and_draws_dropout_per_step(TINY, small, min_accuracy=0.3)
    checks.evaluation_is_deterministic_and_uses_running_averages(TINY, final, small)
    checks.stop_and_resume_is_bit_exact(TINY, small, stop_at=13)


def test_a_vmapped_sweep_group_trains_each_run_as_alone(small):
    checks.sweep_group_matches_runs_alone([config_lib.replace(TINY, seed=0, learning_rate=0.003),
                                           config_lib.replace(TINY, seed=1, learning_rate=0.001)], small)


# Fresh interpreters (XLA_FLAGS must be set before JAX starts): train the tiny VGG and save its state.
DP_SCRIPT = r"""
import json, sys
import jax
import numpy as np
from cnn_jax import config as config_lib
from cnn_jax.data import sources as data
from cnn_jax.engine import train
import jax
config = config_lib.from_dict(json.loads(sys.argv[1]))
final, _ = train.fit(config, data.load(config))
leaves = jax.tree_util.tree_leaves_with_path((final.params, final.model_state))
np.savez(sys.argv[2], **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
print("devices", len(jax.devices()))
"""


def test_batch_norm_under_four_forced_cpu_devices_matches_one_device(mnist_dir, tmp_path):
    """The batch statistics are the global batch's: 4 devices x 16 images train as 1 x 64. The sums run
    in another order, and batch norm's gradient (a difference of near-equal terms) grows those
    rounding differences to ~5e-5 of each array's scale after 2 steps of plain SGD (Adam's first
    steps grow them further), hence the tolerance."""
    config = config_lib.replace(TINY, data_dir=mnist_dir, train_subset=128, test_subset=100, batch_size=64,
                                epochs=1, dropout=0.0, optimizer="sgd", learning_rate=0.02)
    outputs = {}
    for devices in (1, 4):
        path = str(tmp_path / f"d{devices}.npz")
        env = dict(os.environ, XLA_FLAGS=xla_flags(f"--xla_force_host_platform_device_count={devices}"), PYTHONPATH=REPO_ROOT)
        done = subprocess.run([sys.executable, "-c", DP_SCRIPT, json.dumps(config_lib.to_dict(config)), path],
                              capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"devices {devices}" in done.stdout
        assert ("data parallel over 4 cpu devices" in done.stdout) == (devices == 4)
        outputs[devices] = np.load(path)
    one, four = outputs[1], outputs[4]
    assert sorted(one.files) == sorted(four.files) and any("var" in f for f in one.files)
    for name in one.files:
        scale = max(1.0, float(np.abs(one[name]).max()))
        np.testing.assert_allclose(four[name], one[name], rtol=1e-3, atol=5e-4 * scale, err_msg=name)


@pytest.mark.slow
def test_the_command_line_trains_and_resumes_it_bit_exactly(mnist_dir, tmp_path):
    """SIGTERM mid-run, then --resume: the same params, batch-norm statistics and accuracy as an
    uninterrupted run (dropout and augmentation keys come from the step)."""
    out, got = checks.command_line_resumes_bit_exactly(
        mnist_dir, ["--model=vgg", "--widths=4,8", "--depth=1", "--dropout=0.25", "--debug"], tmp_path)
    assert f"strategy: conv={checks.CPU_CONV} pool={'onednn' if checks.CPU_CONV == 'onednn' else 'reshape'} layout=NHWC" in out
    assert "conv1_1  28x28x4\npool1    14x14x4\nconv2_1  14x14x8\npool2    7x7x8\nflatten  392\noutput   10" \
        in out   # --debug
    assert not np.array_equal(got.model_state["bn1_1"]["var"], np.ones(4))   # the statistics moved


def test_init_follows_the_init_flag():
    """he: std sqrt(2 / fan_in) for the convs; lecun: sqrt(1 / fan_in); seed: weight_scale; the output
    layer at gain 1 (except normal)."""
    config = config_lib.replace(TINY, widths=(64, 64))
    for init, conv_std, output_std in [("he", np.sqrt(2 / (9 * 64)), np.sqrt(1 / (7 * 7 * 64))),
                                       ("lecun", np.sqrt(1 / (9 * 64)), np.sqrt(1 / (7 * 7 * 64))),
                                       ("normal", 0.05, 0.05)]:
        params, _ = model.init(jax.random.key(0), config_lib.replace(config, init=init, weight_scale=0.05))
        assert np.std(params["conv2_1"]["w"]) == pytest.approx(conv_std, rel=0.05)
        assert np.std(params["output"]["w"]) == pytest.approx(output_std, rel=0.05)
