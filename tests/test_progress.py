"""Progress: plain lines when not on a terminal, a tqdm bar when on one."""

import io

from cnn_jax.rundir import progress


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    bar = progress.epoch_progress(epoch=1, num_steps=32, first_step=0, stream=out)
    bar.advance(8)
    bar.log(40, 0.23456, 1234.4)
    bar.close()
    assert out.getvalue() == "step 40 (epoch 1, 8/32): loss 0.2346, 1234 img/s\n"
    assert not progress.interactive(out)


def test_a_bar_with_steps_loss_and_throughput_on_a_terminal():
    out = FakeTerminal()
    assert progress.interactive(out)
    bar = progress.epoch_progress(epoch=2, num_steps=50, first_step=10, stream=out)
    bar.advance(5)
    bar.log(115, 0.5, 2000.0)
    bar.close()
    text = out.getvalue()
    assert "Epoch 2" in text and "15/50" in text and "loss=0.5000" in text and "img_s=2000" in text
