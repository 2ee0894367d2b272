"""Progress of an epoch: a tqdm bar on a terminal, plain log lines otherwise (CI, nohup, notebooks).

    bar = progress.epoch_progress(epoch, num_steps, first_step)   # stream=, bar= optional
    bar.advance()                        # after every step (cheap: no device sync)
    bar.log(global_step, loss, ips)      # every log_every steps, with values already on the host
    bar.close()
"""

from __future__ import annotations

import sys
from typing import TextIO


def interactive(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default stdout) is a terminal."""
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _Bar:
    """tqdm bar: steps done / steps in the epoch, with the moving loss and images/s."""

    def __init__(self, epoch: int, num_steps: int, first_step: int, stream: TextIO):
        from tqdm import tqdm
        self._bar = tqdm(total=num_steps, initial=first_step, desc=f"Epoch {epoch}", unit="step",
                         file=stream, leave=False, dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def log(self, step: int, loss: float, images_per_second: float) -> None:
        del step
        self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.0f}")  # and redraw

    def close(self) -> None:
        self._bar.close()


class _Lines:
    """One plain line per log: `step 40 (epoch 1, 8/32): loss 0.2345, 2345 img/s`."""

    def __init__(self, epoch: int, num_steps: int, first_step: int, stream: TextIO):
        self.epoch, self.num_steps, self.first_step, self.stream = epoch, num_steps, first_step, stream
        self.done = first_step

    def advance(self, steps: int = 1) -> None:
        self.done += steps

    def log(self, step: int, loss: float, images_per_second: float) -> None:
        in_epoch = step - self.epoch * self.num_steps
        print(f"step {step} (epoch {self.epoch}, {in_epoch}/{self.num_steps}): loss {loss:.4f}, "
              f"{images_per_second:.0f} img/s", file=self.stream, flush=True)

    def close(self) -> None:
        pass


def epoch_progress(epoch: int, num_steps: int, first_step: int = 0, stream: TextIO | None = None,
                   bar: bool | None = None):
    """A progress reporter for one epoch; `bar` defaults to whether `stream` is a terminal."""
    stream = stream or sys.stdout
    use_bar = interactive(stream) if bar is None else bar
    return (_Bar if use_bar else _Lines)(epoch, num_steps, first_step, stream)
