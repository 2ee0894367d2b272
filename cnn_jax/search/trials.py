"""Train a batch of trials of one shape as one vmapped program, evaluating and pruning as it goes.

`train_trials` is the search's only contact with the training code: it takes the
configs of K trials that share `sweep.group_key` (they differ only in per-run fields:
learning rate, weight scale, momentum, weight decay, seed), trains them with the
sweep's vmapped group step, and at each evaluation point (every `eval_every` steps
within an epoch, and at every epoch end) evaluates every live member on the
validation images and asks `decide` which members to stop. Stopped members (pruned,
or diverged: non-finite loss or state) are *dropped*: their slices of the stacked
params, optimiser state and hyperparameters are removed, and the survivors continue
as a smaller group (a smaller vmapped program, so pruning saves compute). Each run of a
vmapped group computes what it computes alone, so a survivor ends with the params it
would have had with nobody pruned. Each member's losses, moving loss and epoch records are
kept by a `train.RunLog`, as `train.fit` and the sweep's groups keep theirs; the steps run
through `train.run_epoch_steps`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.data import sources as data_lib
from cnn_jax import sweep
from cnn_jax.engine import evaluation, train
from cnn_jax.rundir import progress
from cnn_jax.engine import state as state_lib
from cnn_jax.config import Config

COMPLETE, PRUNED, DIVERGED = "complete", "pruned", "diverged"


@dataclasses.dataclass
class TrialResult:
    """What one member of a group ended with."""

    status: str                              # complete | pruned | diverged
    message: str                             # why it stopped early ("" when complete)
    evaluations: list[dict[str, Any]]        # one record per evaluation it reached
    records: list[dict[str, Any]]            # metrics records ("train" every log_every steps, "evaluation", "epoch")
    state: Any                               # final TrainState on the host (None when diverged)
    log: train.RunLog                        # steps done, moving loss, epoch sums, per-epoch history
    seconds: float                           # wall time from the group's start to this member's end

    @property
    def params(self) -> Any:
        """The final params on the host (None when diverged)."""
        return None if self.state is None else self.state.params

    @property
    def step(self) -> int:
        """Training steps done."""
        return self.log.step


def eval_steps(steps_per_epoch: int, epochs: int, eval_every: int) -> list[int]:
    """Global step counts after which to evaluate: every `eval_every` steps within each epoch
    (0: none) and at each epoch's end."""
    points = []
    for epoch in range(epochs):
        start = epoch * steps_per_epoch
        if eval_every > 0:
            points += [start + s for s in range(eval_every, steps_per_epoch, eval_every)]
        points.append(start + steps_per_epoch)
    return points


def _take(tree: Any, keep: np.ndarray) -> Any:
    """The slices `keep` of every leaf's leading (member) axis."""
    index = jnp.asarray(keep, jnp.int32)
    return jax.tree.map(lambda x: jnp.take(x, index, axis=0), tree)


def train_trials(configs: Sequence[Config], dataset: data_lib.Dataset, val_images: np.ndarray,
                 val_labels: np.ndarray, eval_every: int,
                 decide: Callable[[list[int], list[dict[str, Any]]], Sequence[bool]],
                 on_record: Callable[[int, dict[str, Any]], None] = lambda i, r: None,
                 on_stop: Callable[[int, TrialResult], None] = lambda i, r: None) -> list[TrialResult]:
    """Train `configs` (one `sweep.group_key`) on `dataset`'s training images as one vmapped group.

    At each evaluation point (the last one too, whose answer is ignored: a trial that
    reached its end is complete), `decide(members, evaluations)` gets the indices (into `configs`) of
    the live members and their evaluation records ({"evaluation": n (1-based), "step", "epoch",
    "validation_loss", "validation_accuracy"}) and returns, per member, whether to stop it
    (pruned). `on_record(i, record)` gets every metrics record of member i as it is made;
    `on_stop(i, result)` each member's result as soon as it stops or finishes. Returns the
    results in the order of `configs`.
    """
    if len({sweep.group_key(c) for c in configs}) != 1:
        raise ValueError("train_trials needs configs that differ only in sweep.PER_RUN_FIELDS")
    start_time = time.perf_counter()
    config = configs[0]
    n = len(dataset.train_labels)
    steps_per_epoch = train.steps_per_epoch(config, n)   # ConfigError when there is no full batch
    total_steps = steps_per_epoch * config.epochs
    loop = sweep.resolve_loop(config)
    runner = sweep.compiled_group(sweep.group_key(config), total_steps, loop)
    state = sweep.group_state(configs, total_steps)   # each member's own initial TrainState, stacked
    images, labels = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
    val_x, val_y = jnp.asarray(val_images), jnp.asarray(val_labels)

    live = list(range(len(configs)))          # original indices of the members still training
    results: list[TrialResult | None] = [None] * len(configs)
    evaluations: list[list[dict[str, Any]]] = [[] for _ in configs]
    records: list[list[dict[str, Any]]] = [[] for _ in configs]
    logs = [train.RunLog() for _ in configs]  # each member's host-side record, as `train.fit` keeps it
    diverged: dict[int, str] = {}

    def record(i: int, rec: dict[str, Any]) -> None:
        records[i].append(rec)
        on_record(i, rec)

    def finish(i: int, status: str, message: str, slot: int | None) -> None:
        final = None if slot is None else jax.device_get(state_lib.unstack(state, slot))
        results[i] = TrialResult(status, message, evaluations[i], records[i], final, logs[i],
                                 time.perf_counter() - start_time)
        on_stop(i, results[i])

    def drop(stopped: set[int]) -> None:
        nonlocal state, live
        keep = [slot for slot, i in enumerate(live) if i not in stopped]
        if len(keep) < len(live):
            state = _take(state, np.asarray(keep))
            live = [live[slot] for slot in keep]

    step, points = 0, eval_steps(steps_per_epoch, config.epochs, eval_every)
    epoch_start = time.perf_counter()
    for number, point in enumerate(points, start=1):
        epoch = (point - 1) // steps_per_epoch
        if step % steps_per_epoch == 0:
            epoch_start = time.perf_counter()
        order = jnp.asarray(np.stack([data_lib.epoch_permutation(configs[i].seed, epoch, n) for i in live]))
        first, count = step % steps_per_epoch, point - step
        chunk_start = [time.perf_counter()]

        def absorb(step_metrics: Any) -> None:
            """Each live member's losses of the steps since the last call, into its RunLog."""
            host = train.host_metrics(step_metrics)   # (steps, members)
            now = time.perf_counter()
            ips = len(host["loss"]) * config.batch_size / max(now - chunk_start[0], 1e-9)
            chunk_start[0] = now
            for slot, i in enumerate(live):
                if i in diverged:
                    continue
                new, why = logs[i].absorb(host["loss"][:, slot], host["correct"][:, slot], host["finite"][:, slot],
                                          epoch, configs[i], ips)
                for rec in new:
                    record(i, rec)
                if why:
                    diverged[i] = why

        state, _ = train.run_epoch_steps(
            runner, loop, state, (images, labels), order, first, first + count, step_offset=epoch * steps_per_epoch,
            absorb_every=count, scan_chunk=count, absorb=absorb, bar=progress.silent())
        step = point
        for i in live:
            if i in diverged:
                finish(i, DIVERGED, diverged[i], None)
        drop(set(diverged))
        if not live:
            break
        val = evaluation.evaluate_runs(state.params, state.model_state, val_x, val_y, config)
        evals = []
        for slot, i in enumerate(live):
            held_out = {"loss": float(val["loss"][slot]), "accuracy": float(val["accuracy"][slot])}
            ev = {"evaluation": number, "step": step, "epoch": epoch,
                  "validation_loss": held_out["loss"], "validation_accuracy": held_out["accuracy"]}
            evaluations[i].append(ev)
            record(i, {"kind": "evaluation", **ev})
            if step % steps_per_epoch == 0:
                epoch_record = logs[i].finish_epoch(
                    epoch, logs[i].running_train_eval(steps_per_epoch, config.batch_size), {"validation": held_out},
                    time.perf_counter() - epoch_start, steps_per_epoch * config.batch_size)
                record(i, {"kind": "epoch", **epoch_record})
            evals.append(ev)
        last = number == len(points)
        stop = list(decide(list(live), evals))
        if last:   # a trial that reached its end is complete whatever the pruner says
            stop = [False] * len(live)
        pruned = {i for i, s in zip(live, stop) if s}
        for slot, i in enumerate(live):
            if i in pruned:
                finish(i, PRUNED, f"pruned after evaluation {number} (step {step})", slot)
            elif last:
                finish(i, COMPLETE, "", slot)
        drop(pruned)
        if not live:
            break
    return results   # type: ignore[return-value]
