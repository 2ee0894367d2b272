"""Optimisers: plain SGD is exactly p - lr * g (the tutorial's update); every optax choice builds and steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax.engine import optim
from cnn_jax.config import Config

PARAMS = {"a": {"w": jnp.asarray([1.0, -2.0, 3.0]), "b": jnp.asarray([0.5])}}
GRADS = {"a": {"w": jnp.asarray([0.1, 0.2, -0.3]), "b": jnp.asarray([1.0])}}


def step(config):
    opt = optim.make_optimizer(config, total_steps=10)
    state = opt.init(PARAMS)
    updates, _ = opt.update(GRADS, state, PARAMS)
    return optim.apply_updates(PARAMS, updates)


def test_sgd_is_exactly_p_minus_lr_grad():
    new = step(config_lib.replace(Config(), optimizer="sgd", learning_rate=0.01))
    for p, g, n in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(GRADS), jax.tree.leaves(new)):
        np.testing.assert_array_equal(n, p - 0.01 * g)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam", "adamw"])
@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle", "warmup_cosine"])
def test_optax_optimisers_move_against_the_gradient(name, schedule):
    new = step(config_lib.replace(Config(), optimizer=name, schedule=schedule, learning_rate=0.1))
    moved = [np.sign(np.asarray(p - n)) for p, n in zip(jax.tree.leaves(PARAMS), jax.tree.leaves(new))]
    signs = [np.sign(np.asarray(g)) for g in jax.tree.leaves(GRADS)]
    for m, s in zip(moved, signs):
        if schedule in ("onecycle", "warmup_cosine") and not np.any(m):
            continue  # these schedules may start at (near) zero rate
        if name == "adamw":
            continue  # weight decay may dominate tiny gradients; checked below
        np.testing.assert_array_equal(m, s)


def test_adamw_decays_weights():
    zero = {"a": {"w": jnp.zeros(3), "b": jnp.zeros(1)}}
    opt = optim.make_optimizer(config_lib.replace(Config(), optimizer="adamw", weight_decay=0.5,
                                                  learning_rate=0.1), 10)
    updates, _ = opt.update(zero, opt.init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["a"]["w"], -0.1 * 0.5 * PARAMS["a"]["w"], rtol=1e-6)


def test_schedules_follow_their_shape():
    config = config_lib.replace(Config(), learning_rate=1.0)
    assert optim.learning_rate_schedule(config, 100) == 1.0
    cos = optim.learning_rate_schedule(config_lib.replace(config, schedule="cosine"), 100)
    assert float(cos(0)) == 1.0 and float(cos(100)) < 1e-6
    one = optim.learning_rate_schedule(config_lib.replace(config, schedule="onecycle"), 100)
    assert float(one(0)) < 0.1 and abs(float(one(30)) - 1.0) < 0.05 and float(one(100)) < 1e-3


def _update(config, grads=GRADS, params=PARAMS, steps=1):
    opt = optim.make_optimizer(config, total_steps=10)
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update(grads, state, params)
    return updates


def test_sgd_weight_decay_is_l2_before_momentum_or_decoupled_after_it():
    """--sgd_weight_decay: l2 adds wd * p to the gradient (torch.optim.SGD), decoupled adds it to the
    momentum's update (SGDW, Loshchilov & Hutter 2019); a per-run hyperparameter; off: as before."""
    lr, wd, mu = 0.1, 0.5, 0.9
    base = config_lib.replace(Config(), learning_rate=lr, weight_decay=wd, momentum=mu)
    leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]   # noqa: E731
    for p, g, u in zip(leaves(PARAMS), leaves(GRADS),
                       leaves(_update(config_lib.replace(base, optimizer="sgd", sgd_weight_decay="l2")))):
        np.testing.assert_allclose(u, -lr * (g + wd * p), rtol=1e-6)
    # Two momentum steps on the same gradient: the trace is g, then mu * g + g.
    for mode, want in (("l2", lambda p, g: -lr * ((1 + mu) * (g + wd * p))),
                       ("decoupled", lambda p, g: -lr * ((1 + mu) * g + wd * p))):
        got = _update(config_lib.replace(base, optimizer="momentum", sgd_weight_decay=mode), steps=2)
        for p, g, u in zip(leaves(PARAMS), leaves(GRADS), leaves(got)):
            np.testing.assert_allclose(u, want(p, g), rtol=1e-6)
    opt = optim.make_optimizer(config_lib.replace(base, optimizer="momentum", sgd_weight_decay="l2"), 10)
    assert float(opt.init(PARAMS).hyperparams["weight_decay"]) == wd
    off = optim.make_optimizer(config_lib.replace(base, optimizer="momentum"), 10)
    assert jax.tree.structure(off.init(PARAMS)) == jax.tree.structure(
        optim.make_optimizer(config_lib.replace(Config(), optimizer="momentum"), 10).init(PARAMS))
    with pytest.raises(config_lib.ConfigError, match="^--sgd_weight_decay=l2 applies to --optimizer=sgd or momentum"):
        config_lib.validate(config_lib.replace(Config(), optimizer="adam", sgd_weight_decay="l2"))


def test_gradient_clipping_scales_the_gradient_to_the_global_norm():
    """--grad_clip_norm c: a gradient of global norm n > c is scaled by c / n before the optimiser
    (optax.clip_by_global_norm); a smaller one passes unchanged."""
    norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(GRADS))))
    config = config_lib.replace(Config(), optimizer="sgd", learning_rate=1.0)
    for clip in (0.5 * norm, 2 * norm):
        got = _update(config_lib.replace(config, grad_clip_norm=clip))
        for g, u in zip(jax.tree.leaves(GRADS), jax.tree.leaves(got)):
            np.testing.assert_allclose(u, -np.asarray(g) * min(1.0, clip / norm), rtol=1e-5)
    with pytest.raises(config_lib.ConfigError, match="^--grad_clip_norm=-1.0 is not allowed"):
        config_lib.validate(config_lib.replace(Config(), grad_clip_norm=-1.0))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_warmup_rises_linearly_then_runs_the_schedule_over_the_rest(schedule):
    """--warmup_steps w: lr(s) = peak * s / w for s < w, then the schedule of total - w steps at s - w;
    warmup_cosine is cosine with a tenth's warm-up; refused with warmup_cosine, which has its own."""
    config = config_lib.replace(Config(), learning_rate=2.0, schedule=schedule, warmup_steps=20)
    lr = optim.learning_rate_schedule(config, 100)
    rest = optim.learning_rate_schedule(config_lib.replace(config, warmup_steps=0), 80)
    for s in (0, 5, 10, 19):
        assert float(lr(s)) == pytest.approx(2.0 * s / 20)
    for s in (20, 30, 60, 99):
        assert float(lr(s)) == pytest.approx(float(rest(s - 20)) if callable(rest) else rest, abs=1e-6)
    cosine = optim.learning_rate_schedule(config_lib.replace(config, schedule="cosine", warmup_steps=10), 100)
    builtin = optim.learning_rate_schedule(config_lib.replace(config, schedule="warmup_cosine", warmup_steps=0), 100)
    for s in range(0, 100, 7):
        assert float(cosine(s)) == pytest.approx(float(builtin(s)), abs=1e-6)
    with pytest.raises(config_lib.ConfigError, match="^--warmup_steps=20 is not allowed with --schedule=warmup_cosine"):
        config_lib.validate(config_lib.replace(config, schedule="warmup_cosine"))
