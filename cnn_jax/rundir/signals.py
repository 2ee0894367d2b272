"""Graceful interruption: SIGINT / SIGTERM ask the training loop to checkpoint and stop.

    with signals.stop_on_signals() as stop:
        ...                     # the loop polls `stop.requested` after every step
        if stop.requested:
            save(); raise signals.Interrupted(stop.signum, step)

The handler only records the signal; the loop finishes the step in flight, writes a
checkpoint and raises `Interrupted`. A second signal of the same kind gets the default
action (the process ends at once; the previous checkpoint stays readable).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, signum: int, step: int, where: str = ""):
        self.signum, self.step, self.where = signum, step, where
        name = signal.Signals(signum).name
        saved = f"checkpoint of step {step} saved in {where}" if where else f"stopped at step {step}"
        super().__init__(f"interrupted by {name}: {saved}; continue with --resume")

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class StopRequest:
    """Set by a signal handler; polled by the training loop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signals(signums: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, `signums` set the yielded StopRequest instead of ending the process.

    Handlers can only be installed in the main thread; elsewhere the request never fires.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum, frame):
        del frame
        stop.signum = signum
        signal.signal(signum, signal.SIG_DFL)   # a second one ends the process at once
        print(f"{signal.Signals(signum).name} received: saving a checkpoint after this step "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handle) for s in signums}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
