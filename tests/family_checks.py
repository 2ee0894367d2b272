"""Checks shared by the test files of the batch-normalised families (test_models_vgg.py,
test_models_resnet.py): each takes a small config of the family and asserts real behaviour."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numerics
import pytest

from cnn_jax import config as config_lib
from cnn_jax import model, sweep
from cnn_jax.engine import evaluation, optim, state, step, train
from cnn_jax.models import common
from cnn_jax.nn import onednn

# The convolution `--conv_impl=auto` runs for these families on CPU: oneDNN where it builds.
CPU_CONV = "onednn" if onednn.available() else "patches"


def small_dataset(mnist, train_n=320, test_n=200):
    """The first `train_n` real training images and `test_n` real test images."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:train_n],
                               train_labels=mnist.train_labels[:train_n],
                               test_images=mnist.test_images[:test_n], test_labels=mnist.test_labels[:test_n])


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def strip(records):
    return [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_second")} for r in records]


def shapes_match_the_real_ones(config, input_shape, capsys):
    """apply's logits for `input_shape`, and `layer_shapes` equal to the shapes apply really makes."""
    config = model.validate(config_lib.replace(config, input_shape=input_shape))
    family = model.family(config)
    # Shapes come from tracing alone: eval_shape traces apply once (the shapes print while tracing,
    # as when --debug runs eagerly) and compiles nothing.
    params, model_state = jax.eval_shape(lambda key: model.init(key, config), jax.random.key(0))
    images = jax.ShapeDtypeStruct((3, *input_shape), jnp.float32)
    capsys.readouterr()
    logits, _ = jax.eval_shape(lambda p, s, x, rng: family.apply(p, s, x, config, train=True, rng=rng, debug=True),
                               params, model_state, images, jax.random.key(2))
    assert logits.shape == (3, config.num_classes)
    assert capsys.readouterr().out.strip() == model.format_layer_shapes(config)
    assert family.first_conv(params).shape[:3] == (3, 3, input_shape[2])


def conv_lowerings_agree(config):
    """patches, oneDNN (CPU auto where it builds) and lax give the same logits and gradients; the
    strategy line names them."""
    params, model_state = model.init(jax.random.key(0), config)
    images = jax.random.uniform(jax.random.key(1), (4, *config.input_shape))
    labels = jnp.arange(4) % config.num_classes
    auto = config_lib.replace(config, conv_impl="auto")
    patches = config_lib.replace(config, conv_impl="patches")
    lax = config_lib.replace(config, conv_impl="lax")
    impls = [patches, lax] + ([config_lib.replace(config, conv_impl="onednn")] if onednn.available() else [])
    # On this CPU auto is oneDNN where it builds, else patches.
    assert common.conv_impl(auto) == ("onednn" if onednn.available() else "patches")
    assert common.conv_fn(patches).__name__ == "conv2d_patches"
    for c in impls:
        assert model.strategy(c).describe().startswith(f"conv={c.conv_impl} ")
        assert "layout=NHWC" in model.strategy(c).describe()
    # `--loop=auto`: a scanned epoch, but one call per batch for XLA:CPU's convolution (10-30x
    # slower inside a loop body).
    assert "loop=scan" in model.strategy(config_lib.replace(auto, loop="auto")).describe()
    assert "loop=step" in model.strategy(config_lib.replace(lax, loop="auto")).describe()

    def loss(params, c):
        logits, _ = model.apply(params, model_state, images, c, train=True, rng=jax.random.key(3))
        return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)   # one program per lowering
    reference = jax.tree.leaves(value_and_grad(params, lax))
    for c in impls[:1] + impls[2:]:
        for a, b in zip(jax.tree.leaves(value_and_grad(params, c)), reference):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def training_moves_state_and_draws_dropout_per_step(config, dataset, min_accuracy):
    """fit learns (above chance, better in its second epoch), moves the batch-norm running averages;
    a step's dropout mask comes from fold_in(rng, step), so the same batch at another step updates
    differently."""
    final, history = train.fit(config, dataset)
    assert np.isfinite(history[-1]["moving_loss"]) and history[-1]["test_accuracy"] > min_accuracy  # chance: 0.1
    assert history[-1]["train_accuracy"] > history[0]["train_accuracy"]
    fresh_params, fresh_model_state = model.init(jax.random.key(0), config)
    assert not leaves_equal(final.model_state, fresh_model_state)
    for stats in jax.tree.leaves(final.model_state):
        assert np.all(np.isfinite(stats))

    optimizer = optim.make_optimizer(config, 10)
    train_step = jax.jit(step.make_train_step(config, optimizer))
    batch = (jnp.asarray(dataset.train_images[:16]), jnp.asarray(dataset.train_labels[:16]))
    s0 = state.create(config, optimizer)
    at0, _ = train_step(s0, batch)
    at0_again, _ = train_step(s0, batch)
    at1, _ = train_step(s0.replace(step=s0.step + 1), batch)
    assert leaves_equal(at0.params, at0_again.params)
    assert not leaves_equal(at0.params, at1.params)      # another step, another mask
    no_dropout = config_lib.replace(config, dropout=0.0)
    train_step0 = jax.jit(step.make_train_step(no_dropout, optimizer))
    assert leaves_equal(train_step0(s0, batch)[0].params, train_step0(s0.replace(step=s0.step + 1), batch)[0].params)
    return final


def evaluation_runs_the_lowering_training_runs(config, dataset, monkeypatch):
    """Where the family trains with oneDNN, it evaluates with it (its forward is the faster one),
    to XLA's convolution's accuracy and loss; explicit choices are kept; without oneDNN, `auto`
    evaluates with XLA's convolution (faster forward than patches)."""
    if CPU_CONV == "onednn":
        assert model.inference_config(config) == config
        params, model_state = model.init(jax.random.key(0), config)
        lax_config = config_lib.replace(config, conv_impl="lax", layout="NHWC")
        ours, reference = (evaluation.evaluate(params, model_state, dataset.test_images, dataset.test_labels, c)
                           for c in (config, lax_config))
        assert ours["accuracy"] == reference["accuracy"]
        np.testing.assert_allclose(ours["loss"], reference["loss"], rtol=1e-5)
    explicit = config_lib.replace(config, conv_impl="patches")
    assert model.inference_config(explicit) == explicit
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert model.inference_config(config).conv_impl == "lax"


def evaluation_is_deterministic_and_uses_running_averages(config, final, dataset):
    images, labels = dataset.test_images[:100], dataset.test_labels[:100]
    a = evaluation.evaluate(final.params, final.model_state, images, labels, config)
    b = evaluation.evaluate(final.params, final.model_state, images, labels, config)
    assert a == b
    x = jnp.asarray(images)
    # Jitted (one program per mode) rather than op by op, which compiles every primitive on its own.
    apply = jax.jit(lambda p, s, x, train: model.apply(p, s, x, config, train=train, rng=jax.random.key(0)),
                    static_argnums=3)
    eval_logits, same = apply(final.params, final.model_state, x, False)
    assert leaves_equal(same, final.model_state)
    np.testing.assert_array_equal(eval_logits, apply(final.params, final.model_state, x, False)[0])
    train_logits, _ = apply(final.params, final.model_state, x, True)
    assert not np.allclose(eval_logits, train_logits)
    # Other running averages, other evaluation: the running averages are what evaluation reads.
    shifted = jax.tree.map(lambda v: v * 1.5 + 0.1, final.model_state)
    assert not np.allclose(eval_logits, apply(final.params, shifted, x, False)[0])


def stop_and_resume_is_bit_exact(config, dataset, stop_at):
    saved = []

    def on_stop(s, log):
        saved.append((jax.device_get(s), dataclasses.replace(log, epoch_losses=list(log.epoch_losses))))

    whole, history = train.fit(config, dataset)
    with pytest.raises(train.Stopped):
        train.fit(config, dataset, hooks=train.Hooks(should_stop=lambda s: s == stop_at, on_stop=on_stop))
    assert int(saved[0][0].step) == stop_at
    resumed, resumed_history = train.fit(config, dataset, start=saved[0])
    assert leaves_equal(resumed, whole)          # params, optimiser and batch-norm state, rng, step
    assert strip(resumed_history) == strip(history)


def sweep_group_matches_runs_alone(configs, dataset):
    """A vmapped group trains each run as it trains alone, with its own batch-norm statistics.
    Compared as tests/numerics.py says: 4 momentum steps (128 images, batch 32), each leaf's
    difference against the size of its change, which holds on any CPU and fails a swapped run."""
    configs = [config_lib.replace(c, optimizer="momentum", epochs=1, batch_size=32) for c in configs]
    dataset = dataclasses.replace(dataset, train_images=dataset.train_images[:128],
                                  train_labels=dataset.train_labels[:128])
    result = sweep.train_group(configs, dataset)
    assert result.diverged == [None] * len(configs)
    for i, config in enumerate(configs):
        alone, history = train.fit(config, dataset)
        mine = state.unstack(result.state, i)
        start = state.create(config, optim.make_optimizer(config, 4))
        numerics.assert_updates_close(mine.params, alone.params, start.params, what=f"run {i}'s params")
        numerics.assert_updates_close(mine.model_state, alone.model_state, start.model_state,
                                      what=f"run {i}'s batch-norm statistics")
        assert int(mine.step) == int(alone.step) == 4 and np.array_equal(mine.rng, alone.rng)
        np.testing.assert_allclose([h["moving_loss"] for h in result.histories[i]],
                                   [h["moving_loss"] for h in history], rtol=1e-4)
    first = jax.tree.leaves(result.state.model_state)[0]
    assert not np.allclose(first[0], first[1])     # each run its own batch-norm statistics


def interrupted_and_resumed(args, reference, workdir, env, marker):
    """Run the command line `args(workdir, *extra)` into `reference`, then again into `workdir`
    stopped by SIGTERM on the stdout line holding `marker`, then `--resume`d to the end; return
    the latest checkpoints (state, meta) of the reference and of the resumed run, and the step
    the interrupted run stopped at."""
    import signal
    import subprocess
    from cnn_jax.rundir import checkpoint
    from cnn_jax.rundir import workdir as workdir_lib
    import script_runner
    from conftest import REPO_ROOT
    run = dict(env=env, cwd=REPO_ROOT, timeout=300)
    done = script_runner.run(args(reference), **run)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(args(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO_ROOT)
    for line in proc.stdout:
        if marker in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = checkpoint.latest_step(workdir)
    resumed = script_runner.run(args(workdir, "--resume"), **run)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped}" in resumed.stdout
    want = checkpoint.restore(reference, workdir_lib.read_config(reference))
    got = checkpoint.restore(workdir, workdir_lib.read_config(workdir))
    return done.stdout, want, got, stopped


def command_line_resumes_bit_exactly(mnist_dir, family_flags, tmp_path):
    """train.py with `family_flags` (the model and its fields) on 640 images for 2 epochs of 20 steps,
    SIGTERMed in its second epoch and --resumed: the same state (params, batch-norm statistics,
    optimiser, rng, step) and accuracy as the uninterrupted run. Returns the uninterrupted run's
    output and the final state."""
    import os
    import sys
    from conftest import REPO_ROOT

    def args(workdir, *extra):
        return [sys.executable, os.path.join(REPO_ROOT, "experiments", "train.py"), *family_flags,
                f"--data_dir={mnist_dir}", "--train_subset=640", "--test_subset=200", "--batch_size=32",
                "--epochs=2", "--loop=step", "--log_every=2", "--train_eval=running", "--augment_shift=2",
                f"--workdir={workdir}", *extra]

    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out, (want, want_meta), (got, got_meta), stopped = interrupted_and_resumed(
        args, str(tmp_path / "reference"), str(tmp_path / "interrupted"), env, "(epoch 1, 4/20)")
    assert 20 < stopped < 40
    assert int(got.step) == 40 and leaves_equal(got, want)
    assert got_meta["history"][-1]["test_accuracy"] == want_meta["history"][-1]["test_accuracy"]
    return out, got
