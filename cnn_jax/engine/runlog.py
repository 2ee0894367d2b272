"""What a run keeps on the host besides its TrainState: the step count, the tutorial's
moving-average loss, this epoch's losses and correct counts, and one record per finished epoch.

Together, a TrainState and a RunLog are everything a run needs to continue exactly where it
stopped (what a checkpoint holds). The epoch record and the tutorial's epoch line are written
here once, for every way a run is trained.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from cnn_jax.config import Config, ConfigError

Record = dict[str, Any]


def moving_average(values: np.ndarray, smoothing: float, start: float | None = None) -> float:
    """The tutorial's moving-average loss: m <- (1 - s) * m + s * v, starting at the first value."""
    m = start
    for v in np.asarray(values, np.float64):
        m = float(v) if m is None else (1.0 - smoothing) * m + smoothing * float(v)
    return float("nan") if m is None else m


def format_epoch(record: Record) -> str:
    """One line in the tutorial's form, plus time and throughput."""
    return (f"Epoch {record['epoch']}. Loss: {record['moving_loss']:.4g}, "
            f"Train_acc {record['train_accuracy']:.4f}, Test_acc {record['test_accuracy']:.4f}, "
            f"{record['epoch_time']:.1f} s, {record['images_per_second']:.0f} img/s")


def steps_per_epoch(config: Config, num_train: int) -> int:
    """Full batches per epoch (the last partial batch is dropped); ConfigError when there is none."""
    steps = num_train // config.batch_size
    if steps == 0:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than the {num_train} training images")
    return steps


def host_metrics(step_metrics: Any) -> dict[str, np.ndarray]:
    """Metrics of several steps on the host, stacked along a leading step axis (a list of
    per-step metrics or a scan's stacked ones): no per-length compiles."""
    host = jax.device_get(step_metrics)
    if isinstance(host, list):
        host = {key: np.stack([m[key] for m in host]) for key in host[0]}
    return {key: np.asarray(value) for key, value in host.items()}


@dataclasses.dataclass
class RunLog:
    """A run's host-side record, kept by the training loop for each run it trains."""

    step: int = 0                          # training steps done, over all epochs
    moving_loss: float | None = None       # the tutorial's moving-average loss after `step` steps
    epoch_losses: list[float] = dataclasses.field(default_factory=list)  # this epoch's step losses so far
    epoch_correct: int = 0                 # this epoch's correct training predictions so far
    history: list[Record] = dataclasses.field(default_factory=list)  # one record per finished epoch

    def copy(self) -> "RunLog":
        """An independent copy (the loop appends to its lists)."""
        return dataclasses.replace(self, epoch_losses=list(self.epoch_losses), history=list(self.history))

    def absorb(self, losses: np.ndarray, correct: np.ndarray, finite: np.ndarray, epoch: int,
               config: Config, images_per_second: float) -> tuple[list[Record], str | None]:
        """Take the metrics of the next steps: (the `{"kind": "train"}` records due every
        `log_every` steps, why the run diverged or None). A non-finite loss, parameter or
        state stops the absorbing at that step."""
        records = []
        for loss, right, ok in zip(np.asarray(losses), np.asarray(correct), np.asarray(finite)):
            if not (ok and np.isfinite(loss)):
                what = (f"loss became {loss}" if not np.isfinite(loss)
                        else "parameters or optimiser state became non-finite")
                return records, f"{what} at step {self.step + 1} (epoch {epoch}); lower --learning_rate"
            self.step += 1
            self.moving_loss = moving_average([loss], config.loss_smoothing, self.moving_loss)
            self.epoch_losses.append(float(loss))
            self.epoch_correct += int(right)
            if self.step % config.log_every == 0:
                window = self.epoch_losses[-config.log_every:]
                records.append({"kind": "train", "step": self.step, "epoch": epoch,
                                "loss": float(np.mean(window)), "moving_loss": self.moving_loss,
                                "images_per_second": images_per_second})
        return records, None

    def running_train_eval(self, num_steps: int, batch_size: int) -> dict[str, float]:
        """This epoch's training loss and accuracy taken during the epoch (`--train_eval=running`)."""
        return {"loss": float(np.mean(np.asarray(self.epoch_losses, np.float32))) if self.epoch_losses
                else float("nan"), "accuracy": self.epoch_correct / (num_steps * batch_size)}

    def finish_epoch(self, epoch: int, train_eval: dict[str, Any], held_out: dict[str, dict[str, Any]],
                     epoch_time: float, images: int) -> Record:
        """The epoch's record (appended to `history`); the epoch's sums start again. `held_out`
        maps each evaluated split ("test", "validation") to its loss and accuracy, the record's
        `{split}_loss` and `{split}_accuracy`."""
        record = {
            "epoch": epoch, "step": self.step, "moving_loss": self.moving_loss,
            "train_loss": float(train_eval["loss"]), "train_accuracy": float(train_eval["accuracy"]),
            **{f"{split}_{key}": float(result[key]) for split, result in held_out.items()
               for key in ("loss", "accuracy")},
            "epoch_time": epoch_time, "images_per_second": images / epoch_time,
        }
        self.history.append(record)
        self.epoch_losses, self.epoch_correct = [], 0
        return record
