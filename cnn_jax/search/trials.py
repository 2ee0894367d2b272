"""Train a batch of trials of one shape, evaluating and pruning as it goes.

`train_trials` is the search's only contact with the training code: it takes the configs of K
trials that share `sweep.group_key` (they differ only in per-run fields: learning rate, weight
scale, momentum, weight decay, seed) and trains them through the training loop (`engine.loop`):
one trial as it trains alone, several as one vmapped program. At each evaluation point (every
`eval_every` steps within an epoch, and at every epoch end) every live member is evaluated on the
validation images and `decide` says which members to stop. Stopped members (pruned, or diverged:
non-finite loss or state) leave the group, and the survivors continue as a smaller group.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from cnn_jax.config import Config
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import loop, program as program_lib, train
from cnn_jax.engine.loop import COMPLETE, DIVERGED, PRUNED  # noqa: F401 - the statuses of a TrialResult



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


def train_trials(configs: Sequence[Config], dataset: data_lib.Dataset, val_images: np.ndarray,
                 val_labels: np.ndarray, eval_every: int,
                 decide: Callable[[list[int], list[dict[str, Any]]], Sequence[bool]],
                 on_record: Callable[[int, dict[str, Any]], None] = lambda i, r: None,
                 on_stop: Callable[[int, TrialResult], None] = lambda i, r: None,
                 programs: dict[tuple, program_lib.Program] | None = None) -> list[TrialResult]:
    """Train `configs` (one `sweep.group_key`) on `dataset`'s training images as one vmapped group.

    At each evaluation point (the last one too, whose answer is ignored: a trial that
    reached its end is complete), `decide(members, evaluations)` gets the indices (into `configs`) of
    the live members and their evaluation records ({"evaluation": n (1-based), "step", "epoch",
    "validation_loss", "validation_accuracy"}) and returns, per member, whether to stop it
    (pruned). `on_record(i, record)` gets every metrics record of member i as it is made;
    `on_stop(i, result)` each member's result as soon as it stops or finishes. Returns the
    results in the order of `configs`. `programs` (one dict for a whole search) reuses the
    programs of earlier batches (`engine.program.build`).
    """
    num_steps = train.steps_per_epoch(configs[0], len(dataset.train_labels))   # ConfigError without a full batch
    program, state = program_lib.build(configs, dataset, num_steps, programs=programs)
    records: list[list[dict[str, Any]]] = [[] for _ in configs]

    def record(i: int, rec: dict[str, Any]) -> None:
        records[i].append(rec)
        on_record(i, rec)

    def finish(i: int, outcome: loop.Outcome) -> None:
        kept = None if outcome.status == DIVERGED else jax.device_get(outcome.state)
        results[i] = TrialResult(outcome.status, outcome.message, outcome.evaluations, records[i], kept,
                                 outcome.log, outcome.seconds)
        on_stop(i, results[i])

    results: list[TrialResult | None] = [None] * len(configs)
    hooks = loop.Hooks(on_log=record, on_evaluation=lambda i, ev: record(i, {"kind": "evaluation", **ev}),
                       decide=decide, on_epoch=lambda i, log, rec, state: record(i, {"kind": "epoch", **rec}),
                       on_finish=finish)
    plan = loop.Plan({"validation": (val_images, val_labels)}, full_train=False, eval_split="validation",
                     eval_every=eval_every)
    loop.train_runs(configs, dataset, program, state, [train.RunLog() for _ in configs], hooks, plan)
    return results   # type: ignore[return-value]
