"""The resnet family (cnn_jax/models/resnet.py): shapes for 28x28 and 32x32 inputs, projections
where shapes change, lowerings, training with batch norm and dropout, deterministic evaluation,
bit-exact resume (in process and through the command line) and vmapped sweeps."""

import jax
import numpy as np
import pytest

import family_checks as checks
from cnn_jax import config as config_lib
from cnn_jax import model
from cnn_jax.models import common, resnet
from cnn_jax.nn import layers
from cnn_jax.config import Config, ConfigError

TINY = config_lib.replace(Config(), model="resnet", widths=(8, 16), depth=1, dropout=0.1, epochs=2,
                          batch_size=32, loop="step", train_eval="running", eval_batch_size=100, log_every=5,
                          learning_rate=0.01)


@pytest.fixture(scope="module")
def small(mnist):
    return checks.small_dataset(mnist)


@pytest.mark.parametrize("input_shape", [(28, 28, 1), (32, 32, 3)])
def test_shapes(input_shape, capsys):
    checks.shapes_match_the_real_ones(config_lib.replace(TINY, widths=(4, 8, 8), depth=2), input_shape, capsys)
    config = config_lib.replace(TINY, widths=(4, 8, 8), depth=2, input_shape=input_shape)
    sizes = [shape[0] for name, shape in model.layer_shapes(config) if name.startswith("stage")]
    half = -(-input_shape[0] // 2)
    assert sizes == [input_shape[0]] * 2 + [half] * 2 + [-(-half // 2)] * 2   # the stages halve the size


def test_a_projection_exactly_where_the_shape_changes():
    params, model_state = model.init(jax.random.key(0), config_lib.replace(TINY, widths=(4, 4, 8), depth=2))
    with_projection = sorted(name for name, block in params.items() if "proj" in block)
    assert with_projection == ["stage2_block1", "stage3_block1"]   # stride 2 (and 4 -> 8 channels)
    assert params["stage3_block1"]["proj"]["w"].shape == (4, 8)
    assert set(model_state["stage1_block2"]) == {"bn1", "bn2"} and "final_bn" in model_state


def test_a_block_is_the_pre_activation_formula():
    """The block's output, written out from the layers: conv(relu(bn(conv(relu(bn(x)))))) + shortcut."""
    config = config_lib.replace(TINY, widths=(4, 8), depth=1, dropout=0.0, conv_impl="lax")
    params, model_state = model.init(jax.random.key(0), config)
    images = jax.random.uniform(jax.random.key(1), (2, 28, 28, 1))
    x = layers.conv2d(images, params["stem"]["w"], 0.0, 1, "SAME")
    p = params["stage2_block1"]
    block1 = params["stage1_block1"]
    y1 = layers.conv2d(layers.relu(layers.batch_norm(
        layers.conv2d(layers.relu(layers.batch_norm(x, block1["bn1"]["scale"], block1["bn1"]["bias"],
                                                    0.0, 1.0, train=False)[0]), block1["conv1"]["w"], 0.0, 1, "SAME"),
        block1["bn2"]["scale"], block1["bn2"]["bias"], 0.0, 1.0, train=False)[0]), block1["conv2"]["w"], 0.0, 1, "SAME")
    x = y1 + x
    h = layers.relu(layers.batch_norm(x, p["bn1"]["scale"], p["bn1"]["bias"], 0.0, 1.0, train=False)[0])
    y = layers.conv2d(h, p["conv1"]["w"], 0.0, 2, "SAME")
    y = layers.conv2d(layers.relu(layers.batch_norm(y, p["bn2"]["scale"], p["bn2"]["bias"], 0.0, 1.0,
                                                    train=False)[0]), p["conv2"]["w"], 0.0, 1, "SAME")
    x = y + layers.project(h, p["proj"]["w"], 2)
    fb = params["final_bn"]
    x = layers.global_avg_pool(layers.relu(layers.batch_norm(x, fb["scale"], fb["bias"], 0.0, 1.0, train=False)[0]))
    want = layers.dense(x, params["output"]["w"], params["output"]["b"])
    got, _ = model.apply(params, model_state, images, config)   # fresh running averages: mean 0, var 1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_config_checks_and_flops():
    assert model.validate(config_lib.PRESETS["resnet"]).model == "resnet"
    for overrides, message in [
        ({"widths": ()}, "--widths= is not allowed for --model=resnet"),
        ({"input_shape": (1, 1, 1), "widths": (4, 8)}, "halve the 1x1 input below 1x1"),
        ({"depth": 0}, "--depth=0 is not allowed"),
        ({"conv_impl": "winograd"}, "--conv_impl=winograd is not available for --model=resnet"),
    ]:
        with pytest.raises(ConfigError, match=message):
            model.validate(config_lib.replace(TINY, **overrides))
    config = config_lib.replace(TINY, widths=(4, 8))
    stem = 2 * 28 * 28 * 9 * 1 * 4
    block1 = 2 * 28 * 28 * 9 * (4 * 4 + 4 * 4)
    block2 = 2 * 14 * 14 * 9 * (4 * 8 + 8 * 8) + 2 * 14 * 14 * 4 * 8
    forward = stem + block1 + block2 + 2 * 8 * 10
    assert model.flops(config) == (forward, 3 * forward - stem)
    assert model.strategy(TINY).describe().startswith(f"conv={checks.CPU_CONV} pool=global_mean layout=NHWC")


def test_patches_and_lax_convolutions_agree():
    checks.conv_lowerings_agree(TINY)


def test_evaluation_runs_the_onednn_lowering_training_runs(small, monkeypatch):
    checks.evaluation_runs_the_lowering_training_runs(TINY, small, monkeypatch)


def test_training_evaluation_and_resume(small):
    # A residual network behind global average pooling learns slowly in its first 20 steps: 0.21 here.
    final = checks.training_moves_state_and_draws_dropout_per_step(TINY, small, min_accuracy=0.18)
    checks.evaluation_is_deterministic_and_uses_running_averages(TINY, final, small)
    checks.stop_and_resume_is_bit_exact(TINY, small, stop_at=13)


def test_a_vmapped_sweep_group_trains_each_run_as_alone(small):
    checks.sweep_group_matches_runs_alone([config_lib.replace(TINY, seed=0, learning_rate=0.003),
                                           config_lib.replace(TINY, seed=1, learning_rate=0.001)], small)


@pytest.mark.slow
def test_the_command_line_trains_and_resumes_it_bit_exactly(mnist_dir, tmp_path):
    """SIGTERM mid-run, then --resume: the same params, batch-norm statistics and accuracy as an
    uninterrupted run (dropout and augmentation keys come from the step)."""
    out, got = checks.command_line_resumes_bit_exactly(
        mnist_dir, ["--model=resnet", "--widths=4,8", "--depth=1", "--dropout=0.1"], tmp_path)
    assert f"strategy: conv={checks.CPU_CONV} pool=global_mean layout=NHWC" in out
    assert not np.array_equal(got.model_state["stage1_block1"]["bn1"]["var"], np.ones(4))   # the statistics moved



def test_stochastic_depth_matches_evaluation_in_expectation(small):
    """--drop_path (Huang et al. 2016): rates rising linearly to it over the blocks; evaluation runs
    every branch (the logits of drop_path=0); in training a block's branch is dropped per example
    and the kept ones scaled, so over many keys a block's mean output is its output with every
    branch; training draws other drops per key; other families refuse it."""
    config = config_lib.replace(TINY, dropout=0.0, drop_path=0.5)
    assert resnet.drop_path_rates(config) == [0.25, 0.5]
    plain = config_lib.replace(config, drop_path=0.0)
    params, state = model.init(jax.random.key(0), config)
    images = small.train_images[:16]
    np.testing.assert_array_equal(model.apply(params, state, images, config)[0],
                                  model.apply(params, state, images, plain)[0])
    train = jax.jit(lambda key: model.apply(params, state, images, config, train=True, rng=key)[0])
    full = model.apply(params, state, images, plain, train=True, rng=jax.random.key(1))[0]
    assert not np.allclose(train(jax.random.key(1)), full) and not np.allclose(train(jax.random.key(1)),
                                                                              train(jax.random.key(2)))
    # A block with a projection (stage 2's first), in training, at rate 0.5: the mean over keys.
    x = jax.random.normal(jax.random.key(3), (4, 8, 8, 8))
    p, s = params["stage2_block1"], state["stage2_block1"]
    run = jax.jit(jax.vmap(lambda k: resnet.block(p, s, x, config, 2, train=True, drop_rate=0.5, rng=k)[0]))
    draws = np.asarray(run(jax.random.split(jax.random.key(4), 4000)), np.float64)
    every, _ = resnet.block(p, s, x, config, 2, train=True)
    shortcut = layers.project(layers.relu(common.bn(x, p["bn1"], s["bn1"], config, True)[0]), p["proj"]["w"], 2)
    dropped = np.all(np.isclose(draws, shortcut, atol=1e-5), axis=(2, 3, 4))
    assert 0.45 < dropped.mean() < 0.55 and not dropped.all(axis=0).any()   # per example, per key
    np.testing.assert_allclose(draws.mean(0), every, atol=0.05 * float(np.abs(every).max()))
    for family in ("cnn", "vgg"):
        with pytest.raises(ConfigError, match=f"--drop_path=0.5 is not available for --model={family}"):
            model.validate(config_lib.replace(Config(), model=family, drop_path=0.5))
    with pytest.raises(ConfigError, match=r"--drop_path=1.0 is not allowed: it must be in \[0, 1\)"):
        model.validate(config_lib.replace(config, drop_path=1.0))


def test_a_sweep_group_with_every_training_technique_trains_each_run_as_alone(small):
    """The training techniques are fields like any other: a vmapped group of two seeds with all of
    them on (stochastic depth, label smoothing, mixup or cutmix, random erasing, clipping, warm-up,
    L2 decay with momentum, flip averaging at evaluation) trains each run as it trains alone."""
    techniques = dict(drop_path=0.3, label_smoothing=0.1, mixup_alpha=0.4, cutmix_alpha=1.0, random_erasing=0.5,
                      grad_clip_norm=1.0, warmup_steps=2, sgd_weight_decay="l2", weight_decay=5e-4, tta_flip=True)
    configs = [config_lib.replace(TINY, seed=seed, **techniques) for seed in (0, 1)]
    for config in configs:
        model.validate(config_lib.replace(config, optimizer="momentum"))
    checks.sweep_group_matches_runs_alone(configs, small)
