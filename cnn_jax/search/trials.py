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
would have had with nobody pruned.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import data as data_lib
from cnn_jax import evaluation, sweep, train
from cnn_jax import state as state_lib
from cnn_jax.config import Config, ConfigError

COMPLETE, PRUNED, DIVERGED = "complete", "pruned", "diverged"


@dataclasses.dataclass
class TrialResult:
    """What one member of a group ended with."""

    status: str                              # complete | pruned | diverged
    message: str                             # why it stopped early ("" when complete)
    evaluations: list[dict[str, Any]]        # one record per evaluation it reached
    records: list[dict[str, Any]]            # metrics records ("train" every log_every steps, "epoch")
    state: Any                               # final TrainState on the host (None when diverged)
    step: int                                # training steps done
    moving_loss: float | None
    seconds: float                           # wall time from the group's start to this member's end

    @property
    def params(self) -> Any:
        """The final params on the host (None when diverged)."""
        return None if self.state is None else self.state.params


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
    steps_per_epoch = train.steps_per_epoch(config, n)
    if steps_per_epoch == 0:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than the {n} training images")
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
    moving: list[float | None] = [None] * len(configs)
    epoch_losses: list[list[float]] = [[] for _ in configs]
    epoch_correct = [0] * len(configs)
    diverged: dict[int, str] = {}

    def record(i: int, rec: dict[str, Any]) -> None:
        records[i].append(rec)
        on_record(i, rec)

    def finish(i: int, status: str, message: str, slot: int | None, step: int) -> None:
        final = None if slot is None else jax.device_get(state_lib.unstack(state, slot))
        results[i] = TrialResult(status, message, evaluations[i], records[i], final, step, moving[i],
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
        first = step % steps_per_epoch
        if loop == "step":
            chunks = []
            for s in range(first, first + point - step):
                state, metrics = runner(state, images, labels, order, np.int32(s))
                chunks.append(metrics)
            host = jax.device_get(chunks)
            host = {key: np.stack([m[key] for m in host]) for key in host[0]}
        else:
            state, metrics = runner(state, images, labels, order, np.int32(first), point - step)
            host = jax.device_get(metrics)
        losses, correct = np.asarray(host["loss"]), np.asarray(host["correct"])   # (steps, members)
        finite = np.asarray(host["finite"]) & np.isfinite(losses)
        for slot, i in enumerate(live):
            c = configs[i]
            for s in range(len(losses)):
                global_step = step + s + 1
                if not finite[s, slot]:
                    what = (f"loss became {losses[s, slot]}" if not np.isfinite(losses[s, slot])
                            else "parameters or optimiser state became non-finite")
                    diverged[i] = f"{what} at step {global_step} (epoch {epoch}); lower --learning_rate"
                    break
                moving[i] = train.moving_average([losses[s, slot]], c.loss_smoothing, moving[i])
                epoch_losses[i].append(float(losses[s, slot]))
                epoch_correct[i] += int(correct[s, slot])
                if global_step % c.log_every == 0:
                    window = epoch_losses[i][-c.log_every:]
                    record(i, {"kind": "train", "step": global_step, "epoch": epoch,
                               "loss": float(np.mean(window)), "moving_loss": moving[i]})
        step = point
        for slot, i in enumerate(live):
            if i in diverged:
                finish(i, DIVERGED, diverged[i], None, step)
        drop(set(diverged))
        if not live:
            break
        val = evaluation.evaluate_runs(state.params, state.model_state, val_x, val_y, config)
        evals = []
        for slot, i in enumerate(live):
            ev = {"evaluation": number, "step": step, "epoch": epoch,
                  "validation_loss": float(val["loss"][slot]), "validation_accuracy": float(val["accuracy"][slot])}
            evaluations[i].append(ev)
            record(i, {"kind": "evaluation", **ev})
            if step % steps_per_epoch == 0:
                seen = len(epoch_losses[i])
                record(i, {"kind": "epoch", "epoch": epoch, "step": step, "moving_loss": moving[i],
                           "train_loss": float(np.mean(epoch_losses[i])) if seen else None,
                           "train_accuracy": epoch_correct[i] / (seen * configs[i].batch_size) if seen else None,
                           "validation_loss": ev["validation_loss"],
                           "validation_accuracy": ev["validation_accuracy"],
                           "epoch_time": time.perf_counter() - epoch_start})
                epoch_losses[i], epoch_correct[i] = [], 0
            evals.append(ev)
        last = number == len(points)
        stop = list(decide(list(live), evals))
        if last:   # a trial that reached its end is complete whatever the pruner says
            stop = [False] * len(live)
        pruned = {i for i, s in zip(live, stop) if s}
        for slot, i in enumerate(live):
            if i in pruned:
                finish(i, PRUNED, f"pruned after evaluation {number} (step {step})", slot, step)
            elif last:
                finish(i, COMPLETE, "", slot, step)
        drop(pruned)
        if not live:
            break
    return results   # type: ignore[return-value]
