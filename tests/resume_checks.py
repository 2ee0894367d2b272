"""A run stopped mid-epoch with a checkpoint (what the SIGTERM hook saves), restored and finished,
beside the same run uninterrupted: shared by the tests of features the checkpoint must carry."""

import pytest

from cnn_jax.engine import train
from cnn_jax.rundir import checkpoint


def stop_and_resume(config, dataset, workdir: str, stop_step: int, steps_per_epoch: int):
    """((state, history) uninterrupted, (state, history) resumed, the restored (state, log));
    `config` must poll stop requests after every step (`loop="step"`)."""
    whole = train.fit(config, dataset)
    manager = checkpoint.open_manager(workdir)

    def on_stop(state, log):
        checkpoint.save(manager, state, checkpoint.checkpoint_meta(log, config, steps_per_epoch))

    with pytest.raises(train.Stopped):
        train.fit(config, dataset, hooks=train.Hooks(should_stop=lambda step: step == stop_step, on_stop=on_stop))
    manager.close()
    start = checkpoint.restore_state(workdir, checkpoint.fresh_state(config), steps_per_epoch)
    return whole, train.fit(config, dataset, start=start), start
