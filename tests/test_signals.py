"""SIGINT / SIGTERM become a stop request inside `stop_on_signals`, and only there."""

import os
import signal

import pytest

from cnn_jax.rundir import signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_sets_the_request_instead_of_ending_the_process(signum, capsys):
    before = signal.getsignal(signum)
    with signals.stop_on_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signum)
        assert stop.requested and stop.signum == signum
        assert signal.getsignal(signum) == signal.SIG_DFL     # a second one would end the process
    assert signal.getsignal(signum) == before
    assert "saving a checkpoint" in capsys.readouterr().err


def test_interrupted_names_the_signal_step_and_fix():
    error = signals.Interrupted(signal.SIGTERM, 40, "/runs/a/checkpoints")
    assert str(error) == ("interrupted by SIGTERM: checkpoint of step 40 saved in /runs/a/checkpoints; "
                          "continue with --resume")
    assert error.exit_status == 128 + signal.SIGTERM
