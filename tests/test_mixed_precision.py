"""Mixed precision (--compute_dtype=bfloat16), written once through every lowering: each product
takes bfloat16 inputs and accumulates in float32, forward and backward, so outputs and gradients
are float32 and close to float32's; params, optimiser state and batch-norm statistics stay float32;
a checkpoint trained in one dtype evaluates in the other; a bfloat16 run resumes bit-exactly; a
CPU without bfloat16 instructions is a one-line error; float32 is the code it was."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from resume_checks import stop_and_resume

from cnn_jax import config as config_lib
from cnn_jax import model, run
from cnn_jax.config import Config, ConfigError
from cnn_jax.engine import evaluation, train
from cnn_jax.models import cnn_blocks
from cnn_jax.nn import layers, lowering, onednn
from cnn_jax.rundir import checkpoint

BF16 = "bfloat16"
needs_bf16 = pytest.mark.skipif(not lowering.bf16_support(), reason="this CPU has no bfloat16 instructions")
# A product of bfloat16-rounded inputs (8 significant bits: relative 2**-9 each) accumulated in
# float32: its relative (Frobenius) error against float32 stays near 2**-8.
TOLERANCE = 1e-2


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _rounded(*arrays):
    """The arrays rounded to bfloat16 and back: float32 inputs on which the float32 lowering and the
    bfloat16 one take the same values, so their difference is the products' rounding alone."""
    return tuple(a.astype(jnp.bfloat16).astype(jnp.float32) for a in arrays)


def _draw(shape_x, shape_w, out):
    kx, kw, kb = jax.random.split(jax.random.key(0), 3)
    return _rounded(jax.random.normal(kx, shape_x), 0.1 * jax.random.normal(kw, shape_w),
                    0.1 * jax.random.normal(kb, (out,)))


def _value_and_grads(f, x, w, b):
    y = f(x, w, b)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), (0, 1, 2))(x, w, b)
    return (y,) + grads


def _check_close(f32, bf16):
    for a, b in zip(bf16, f32):
        assert a.dtype == jnp.float32, a.dtype
        assert _rel(a, b) < TOLERANCE, _rel(a, b)


NHWC_CONVS = {"lax": layers.conv2d, "patches": layers.conv2d_patches, "onednn": onednn.conv2d}


@needs_bf16
@pytest.mark.parametrize("impl", sorted(NHWC_CONVS))
@pytest.mark.parametrize("stride, padding", [(1, "SAME"), (2, "VALID")])
def test_every_nhwc_convolution_is_float32_out_and_close_in_value_and_gradient(impl, stride, padding):
    if impl == "onednn" and not onednn.available():
        pytest.skip("oneDNN does not build here")
    x, w, b = _draw((4, 10, 10, 16), (3, 3, 16, 8), 8)
    conv = NHWC_CONVS[impl]
    f32 = _value_and_grads(lambda *a: conv(*a, stride, padding), x, w, b)
    bf16 = _value_and_grads(lambda *a: conv(*a, stride, padding, compute_dtype=BF16), x, w, b)
    _check_close(f32, bf16)


@needs_bf16
def test_dense_and_matmul_are_float32_out_and_close():
    x, w, b = _draw((32, 50), (50, 10), 10)
    _check_close(_value_and_grads(layers.dense, x, w, b),
                 _value_and_grads(lambda *a: layers.dense(*a, compute_dtype=BF16), x, w, b))
    # The plain float32 path is the plain product.
    assert np.array_equal(layers.matmul(x, w), x @ w)


@needs_bf16
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_the_fused_channel_major_block_is_close(pool):
    x, w, b = _draw((16, 12, 12, 8), (3, 3, 16, 24), 24)
    x = jnp.abs(x)   # away from relu's kink and pooling's ties, where a rounding flips the gradient's path
    block = lambda cd: lambda *a: cnn_blocks.pooled_conv_chwn(*a, 1, "VALID", pool, 2, cd)  # noqa: E731
    _check_close(_value_and_grads(block("float32"), x, w, b), _value_and_grads(block(BF16), x, w, b))


@needs_bf16
def test_the_winograd_block_runs_its_products_in_bfloat16_with_float32_transforms():
    """F(4x4, 5x5) amplifies its products' rounding through the output transform: a bfloat16
    Winograd block is a few percent off float32 (docs/performance.md), still float32 out."""
    x, w, b = _draw((20, 12, 12, 8), (5, 5, 20, 16), 16)
    block = lambda cd: lambda *a: cnn_blocks.pooled_conv_winograd(*a, "VALID", "avg", 2, cd)  # noqa: E731
    f32, bf16 = _value_and_grads(block("float32"), x, w, b), _value_and_grads(block(BF16), x, w, b)
    assert all(a.dtype == jnp.float32 for a in bf16)
    assert _rel(bf16[0], f32[0]) < 0.1 and _rel(bf16[2], f32[2]) < 0.3


@needs_bf16
def test_onednn_max_pooling_in_bfloat16_is_the_rounded_float32_pooling():
    if not onednn.available():
        pytest.skip("oneDNN does not build here")
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 16))
    pooled = onednn.max_pool(x.astype(jnp.bfloat16), 2)
    assert pooled.dtype == jnp.bfloat16
    assert np.array_equal(pooled, onednn.max_pool(x, 2).astype(jnp.bfloat16))   # rounding is monotone
    assert jax.grad(lambda a: jnp.sum(onednn.max_pool(a.astype(jnp.bfloat16), 2).astype(jnp.float32)))(x).dtype \
        == jnp.float32


def test_a_cpu_without_bfloat16_instructions_is_one_line(monkeypatch):
    assert lowering.bf16_flag("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n\n") == ""
    assert lowering.bf16_flag("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n\n") == "AMX_BF16"
    assert lowering.bf16_flag("processor\t: 0\nFeatures\t: fp asimd bf16\n") == "BF16"
    monkeypatch.setattr(lowering, "bf16_support", lambda: "")
    config = config_lib.replace(Config(), compute_dtype=BF16)
    with pytest.raises(ConfigError, match=r"^--compute_dtype=bfloat16: this CPU has no bfloat16 instructions.*"
                                          r"use --compute_dtype=float32$"):
        lowering.resolve(config, "cpu")
    assert lowering.resolve(config, "gpu").compute_dtype == BF16   # accelerators run it natively
    lowering.resolve(Config(), "cpu")                               # float32 never asks


def test_auto_leaves_winograd_to_float32(monkeypatch):
    """Winograd's transforms amplify bfloat16's rounding (~3% off in value): in bfloat16 the
    tutorial CNN's `auto` convolution is oneDNN's (NHWC, and evaluation keeps it), or patches
    without oneDNN or in a CHWN layout; explicit Winograd is still honoured."""
    monkeypatch.setattr(lowering, "bf16_support", lambda: "AVX512_BF16")
    monkeypatch.setattr(onednn, "available", lambda: True)
    bf16 = config_lib.replace(Config(), compute_dtype=BF16)
    assert lowering.resolve(Config(), "cpu").conv_impl == "winograd"
    on_cpu = lowering.resolve(bf16, "cpu")
    assert (on_cpu.conv_impl, on_cpu.layout) == ("onednn", "NHWC")
    assert lowering.resolve(bf16, "gpu").conv_impl == "lax"
    if jax.default_backend() == "cpu":
        assert lowering.inference_config(bf16) == bf16
    chwn = config_lib.replace(bf16, layout="CHWN")
    assert lowering.resolve(chwn, "cpu").conv_impl == "patches"
    assert lowering.resolve(config_lib.replace(bf16, conv_impl="winograd"), "cpu").conv_impl == "winograd"
    monkeypatch.setattr(onednn, "available", lambda: False)
    without_onednn = lowering.resolve(bf16, "cpu")
    assert (without_onednn.conv_impl, without_onednn.layout) == ("patches", "CHWN")
    assert lowering.inference_config(bf16).conv_impl == "lax"


def test_the_field_is_checked_and_named_on_the_strategy_line():
    with pytest.raises(ConfigError, match=r"^--compute_dtype='float16' is not allowed: use one of float32, bfloat16$"):
        config_lib.validate(config_lib.replace(Config(), compute_dtype="float16"))
    assert "compute" not in lowering.resolve(Config(), "cpu").describe()
    if lowering.bf16_support():
        line = model.strategy(config_lib.replace(Config(), compute_dtype=BF16)).describe()
        assert line.endswith(f"compute=bfloat16 ({lowering.bf16_support()})")


FAMILIES = {"cnn": config_lib.replace(Config(), epochs=1, train_eval="running", log_every=5),
            "vgg": config_lib.replace(config_lib.PRESETS["vgg"], widths=(8, 16), depth=1, epochs=1, batch_size=64,
                                      eval_batch_size=100, augment_shift=0)}


@pytest.fixture(scope="module")
def tiny(mnist):
    """640 real training images (10 steps of 64) and 200 real test images."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:640], train_labels=mnist.train_labels[:640],
                               test_images=mnist.test_images[:200], test_labels=mnist.test_labels[:200])


@needs_bf16
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_bfloat16_run_keeps_float32_state_learns_and_evaluates_in_either_dtype(tiny, family):
    config = config_lib.replace(FAMILIES[family], compute_dtype=BF16)
    final, history = train.fit(config, tiny)
    leaves = jax.tree.leaves((final.params, final.opt_state, final.model_state))
    assert all(leaf.dtype == jnp.float32 for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating))
    assert history[-1]["test_accuracy"] > 0.5
    images, labels = tiny.test_images, tiny.test_labels
    in_bf16 = evaluation.evaluate(final.params, final.model_state, images, labels, config)
    in_f32 = evaluation.evaluate(final.params, final.model_state, images, labels,
                                 config_lib.replace(config, compute_dtype="float32"))
    assert abs(in_bf16["accuracy"] - in_f32["accuracy"]) <= 0.02


@needs_bf16
def test_a_checkpoint_trained_in_one_dtype_evaluates_in_the_other(tiny, tmp_path):
    for trained, evaluated in (("float32", BF16), (BF16, "float32")):
        config = config_lib.replace(FAMILIES["cnn"], compute_dtype=trained)
        workdir = str(tmp_path / trained)
        history = run.train_and_evaluate(config, workdir, dataset=tiny)
        saved_config, state, _ = checkpoint.restore_run(workdir)
        assert saved_config.compute_dtype == trained
        other = evaluation.evaluate(state.params, state.model_state, tiny.test_images, tiny.test_labels,
                                    config_lib.replace(saved_config, compute_dtype=evaluated))
        assert abs(other["accuracy"] - history[-1]["test_accuracy"]) <= 0.02


@needs_bf16
def test_a_bfloat16_run_resumes_bit_exactly_from_a_mid_epoch_checkpoint(tiny, tmp_path):
    config = config_lib.replace(FAMILIES["cnn"], epochs=2, loop="step", compute_dtype=BF16)
    (whole, whole_history), (final, history), _ = stop_and_resume(config, tiny, str(tmp_path / "run"), 13, 10)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(whole.params)))
    assert [h["test_loss"] for h in history] == [h["test_loss"] for h in whole_history]
