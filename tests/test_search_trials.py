"""cnn_jax.search.trials: K trials as one vmapped group; pruned members dropped, survivors undisturbed."""

import dataclasses

import jax
import numpy as np
import pytest

from cnn_jax import config as config_lib
from cnn_jax.search import trials


@pytest.fixture(scope="module")
def small(mnist):
    """256 training images (8 steps of 32), 64 validation images."""
    train = dataclasses.replace(mnist, train_images=mnist.train_images[:256], train_labels=mnist.train_labels[:256],
                                test_images=mnist.test_images[:64], test_labels=mnist.test_labels[:64])
    return train, mnist.train_images[256:320], mnist.train_labels[256:320]


def _configs(*learning_rates, optimizer="momentum"):
    base = config_lib.Config(optimizer=optimizer, batch_size=32, epochs=2, log_every=4, conv_filters=(8, 16),
                             num_fc=32)
    return [config_lib.replace(base, learning_rate=lr, seed=i) for i, lr in enumerate(learning_rates)]


def test_evaluation_points_are_every_n_steps_and_each_epoch_end():
    assert trials.eval_steps(10, 2, 0) == [10, 20]
    assert trials.eval_steps(10, 2, 4) == [4, 8, 10, 14, 18, 20]
    assert trials.eval_steps(8, 1, 8) == [8]


def test_pruned_members_are_dropped_and_survivors_end_with_their_unpruned_params(small):
    train, val_x, val_y = small
    configs = _configs(0.01, 0.05, 0.1)
    full = trials.train_trials(configs, train, val_x, val_y, 4, lambda members, evs: [False] * len(members))
    group_sizes, stopped = [], []

    def prune_member_1_at_evaluation_2(members, evaluations):
        group_sizes.append(len(members))
        return [i == 1 and ev["evaluation"] == 2 for i, ev in zip(members, evaluations)]

    pruned = trials.train_trials(configs, train, val_x, val_y, 4, prune_member_1_at_evaluation_2,
                                 on_stop=lambda i, result: stopped.append((i, result.status)))
    assert [r.status for r in full] == ["complete"] * 3
    assert [r.status for r in pruned] == ["complete", "pruned", "complete"]
    assert group_sizes == [3, 3, 2, 2]               # the group shrank after the pruning
    assert stopped[0] == (1, "pruned")               # reported at once, before the survivors finish
    assert pruned[1].step == 8 and len(pruned[1].evaluations) == 2 and full[1].step == 16
    # The pruned member's params are those of its unpruned self at step 8: its evaluations agree so far.
    assert pruned[1].evaluations == full[1].evaluations[:2]
    for i in (0, 2):
        for mine, theirs in zip(jax.tree.leaves(pruned[i].params), jax.tree.leaves(full[i].params)):
            np.testing.assert_array_equal(mine, theirs)
        assert pruned[i].evaluations == full[i].evaluations
    # Each member's host-side record is a train.RunLog, as train.fit keeps it: its epoch records
    # are the metrics' "epoch" records, with the validation split's loss and accuracy.
    epochs = [r for r in pruned[0].records if r["kind"] == "epoch"]
    assert [{"kind": "epoch", **h} for h in pruned[0].log.history] == epochs and len(epochs) == 2
    ends = [ev for ev in pruned[0].evaluations if ev["step"] % 8 == 0]
    assert [e["validation_accuracy"] for e in epochs] == [ev["validation_accuracy"] for ev in ends]
    assert "test_accuracy" not in epochs[0] and 0 <= epochs[0]["train_accuracy"] <= 1
    assert pruned[1].log.step == 8 and len(pruned[1].log.history) == 1
    assert [r["step"] for r in pruned[0].records if r["kind"] == "train"] == [4, 8, 12, 16]
    assert pruned[0].evaluations[-1]["validation_accuracy"] > 0.3   # it learned something in 16 steps


def test_a_diverging_member_is_dropped_and_the_others_finish(small):
    """Adam at lr 1e6 overflows its state: that member is diverged and dropped, the other finishes."""
    train, val_x, val_y = small
    results = trials.train_trials(_configs(0.001, 1e6, optimizer="adam"), train, val_x, val_y, 0, lambda m, e: [False] * len(m))
    assert results[0].status == "complete" and results[0].params is not None
    assert results[1].status == "diverged" and "lower --learning_rate" in results[1].message
    assert results[1].params is None and results[1].evaluations == []


def test_a_trial_trained_alone_gives_the_digits_of_the_same_run_trained_by_train_py(small):
    """A batch of one trains the program `engine.train.fit` trains: the same params, bit for bit."""
    from cnn_jax.engine import train as train_lib
    train, val_x, val_y = small
    config = config_lib.replace(_configs(0.02)[0], optimizer="adam")
    result, = trials.train_trials([config], train, val_x, val_y, 4, lambda members, evs: [False] * len(members))
    alone, history = train_lib.fit(config, train)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(result.state.params),
                                                    jax.tree.leaves(jax.device_get(alone.params))))
    assert [r["moving_loss"] for r in result.log.history] == [h["moving_loss"] for h in history]
