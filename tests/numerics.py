"""How far two trainings of the same config may differ: a tolerance stated per leaf, relative to
the leaf's update, that holds on any x86 CPU and still fails the bugs it guards against.

Two programs computing the same training (4 devices against 1, a vmapped group against runs
alone) sum in different orders, and how they round depends on the CPU (AVX-512 or AVX2 kernels,
Winograd's batch-dependent transforms). Each gradient then differs by a few float32 ulps of its
terms. Elementwise relative tolerances fail on that for values near zero (a bias after a few
steps), and long or unstable trainings (Adam's normalisation of near-zero gradients, or 16
momentum steps at a high learning rate) turn it into 1e-3-level parameter differences whose size
depends on the CPU. So the comparisons run few steps of SGD or momentum, where the result
responds linearly to gradient noise (a relative noise r on every update moves the result by about
r relative to the update: measured for r up to 1e-4 with 2 SGD steps, 1e-3 with 4 momentum steps;
at r = 1e-4, 8 SGD steps at lr 0.1 already moved it by 3e-2 and 16 momentum steps by 2e-3), and
compare each leaf's difference with the size of its update:

    max|got - want| <= UPDATE_RTOL * max|want - start|      (per leaf)

UPDATE_RTOL = 1e-3 admits gradient rounding a hundred times float32's and more (~1e-6 relative
for sums of a few hundred terms) and rejects a gradient scaled by 1.01 on every leaf (~1e-2), a
gradient summed instead of averaged over devices, a duplicated batch shard and a run swapped
with another (tests/test_parallel.py and tests/test_sweep.py plant each of these).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

UPDATE_RTOL = 1e-3


def _leaves(tree: Any) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def update_mismatch(got: Any, want: Any, start: Any) -> dict[str, float]:
    """Per leaf: max|got - want| / max|want - start| (start: the params both trainings began from)."""
    got, want, start = _leaves(got), _leaves(want), _leaves(start)
    assert sorted(got) == sorted(want) == sorted(start), (sorted(got), sorted(want))
    ratios = {}
    for name in want:
        scale = np.abs(want[name] - start[name]).max()
        assert scale > 0, f"{name} did not move: nothing to compare"
        ratios[name] = float(np.abs(got[name] - want[name]).max() / scale)
    return ratios


def assert_updates_close(got: Any, want: Any, start: Any, rtol: float = UPDATE_RTOL, what: str = "") -> None:
    """Fail naming every leaf whose difference exceeds rtol times the size of its update."""
    ratios = update_mismatch(got, want, start)
    bad = {name: f"{r:.2e}" for name, r in ratios.items() if not r <= rtol}
    assert not bad, f"{what}: max|got - want| / max|update| above {rtol:g} for {bad}"


def perturb_updates(relative: float):
    """An `optim.apply_updates` whose updates carry a fixed relative noise of size `relative`:
    a stand-in for another CPU's rounding of the gradient (to monkeypatch into cnn_jax.engine.optim)."""
    import jax.numpy as jnp

    def apply_updates(params, updates):
        def noisy(p, u):
            pattern = jnp.sin(jnp.arange(u.size, dtype=jnp.float32) * 1.7).reshape(u.shape)
            return p + u * (1 + relative * pattern)
        return jax.tree.map(noisy, params, updates)

    return apply_updates
