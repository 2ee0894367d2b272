"""cnn_jax.search.study: the validation split, studies and their settings, the budget of trials."""

import numpy as np
import optuna
import pytest

from cnn_jax import config as config_lib
from cnn_jax.data import sources as data
from cnn_jax.config import ConfigError
from cnn_jax.search import space as space_lib
from cnn_jax.search import study as study_lib


# ----------------------------------------------------------------------------- in-process


def test_validation_is_the_last_training_images_and_test_objectives_use_the_test_set(mnist):
    small = data.from_arrays("mnist", (mnist.train_images[:120] * 255).astype(np.uint8), mnist.train_labels[:120],
                             (mnist.test_images[:30] * 255).astype(np.uint8), mnist.test_labels[:30],
                             mnist.class_names)
    settings = study_lib.Settings(space_lib.parse("learning_rate=uniform(0.01,0.1)"), config_lib.Config())
    train, val_x, val_y = study_lib.split_validation(small, settings)
    assert len(train.train_labels) == 100 and len(val_y) == 20          # a sixth by default
    np.testing.assert_array_equal(val_x, small.train_images[100:])
    np.testing.assert_array_equal(val_y, small.train_labels[100:])
    train, val_x, val_y = study_lib.split_validation(small, study_lib.Settings(settings.space, settings.base,
                                                                               validation_size=30))
    assert len(train.train_labels) == 90 and len(val_y) == 30
    train, val_x, val_y = study_lib.split_validation(small, study_lib.Settings(settings.space, settings.base,
                                                                               objective="test_accuracy"))
    assert len(train.train_labels) == 120 and val_x is small.test_images
    with pytest.raises(ConfigError, match="--validation_size=120 is not allowed"):
        study_lib.split_validation(small, study_lib.Settings(settings.space, settings.base, validation_size=120))


def test_a_study_of_that_name_with_another_space_or_base_config_is_refused(tmp_path):
    storage = study_lib.open_storage(study_lib.default_storage(str(tmp_path)), 1, 3)
    a = study_lib.Settings(space_lib.parse("learning_rate=loguniform(1e-3,1e-1)"), config_lib.Config())
    sampler, pruner = "random", optuna.pruners.NopPruner()
    study_lib.open_study(storage, "s", a, sampler, 0, pruner)
    study_lib.open_study(storage, "s", a, sampler, 0, pruner)        # the same settings join it
    b = study_lib.Settings(space_lib.parse("learning_rate=loguniform(1e-3,1e-2)"), config_lib.Config())
    with pytest.raises(ConfigError, match="study 's' exists with another --space"):
        study_lib.open_study(storage, "s", b, sampler, 0, pruner)
    c = study_lib.Settings(a.space, config_lib.Config(num_fc=64))
    with pytest.raises(ConfigError, match=r"exists with another --num_fc \(128 there, 64 here\)"):
        study_lib.open_study(storage, "s", c, sampler, 0, pruner)
    # How a worker runs (data_dir, loop, ...) may differ between workers.
    study_lib.open_study(storage, "s", study_lib.Settings(a.space, config_lib.Config(data_dir="/elsewhere")),
                         sampler, 0, pruner)


def test_the_budget_counts_every_worker_and_surplus_trials_are_failed_untrained(tmp_path):
    storage = study_lib.open_storage(study_lib.default_storage(str(tmp_path)), 1, 3)
    settings = study_lib.Settings(space_lib.parse("learning_rate=loguniform(1e-3,1e-1)"), config_lib.Config())
    one = study_lib.open_study(storage, "s", settings, "random", 0, optuna.pruners.NopPruner())
    two = study_lib.open_study(storage, "s", settings, "random", 0, optuna.pruners.NopPruner())
    beats = study_lib.Heartbeats(storage, 1)
    try:
        first = study_lib.ask_batch(one, settings, 3, 2, beats)
        second = study_lib.ask_batch(two, settings, 3, 2, beats)     # only one left
        assert [len(first), len(second)] == [2, 1]
        # A worker that joins with the same --seed does not repeat the first worker's proposals.
        assert second[0].params not in [t.params for t in first]
        assert study_lib.ask_batch(one, settings, 3, 2, beats) == []
        # A worker that asked at the same time as another gets a trial numbered past the budget:
        # it is failed as surplus, untrained, while those within the budget are kept.
        with pytest.warns(UserWarning, match="Heartbeat"):   # Optuna's note on heartbeats with ask
            racing = two.ask()
        assert study_lib.drop_surplus(two, [racing], 3) == []
        assert one.trials[racing.number].state == optuna.trial.TrialState.FAIL
        assert one.trials[racing.number].user_attrs == {"outcome": "surplus"}
        assert study_lib.drop_surplus(one, first, 3) == first
        # A failed trial frees its place.
        one.tell(first[0], state=optuna.trial.TrialState.FAIL)
        assert len(study_lib.ask_batch(one, settings, 3, 2, beats)) == 1
    finally:
        beats.close()
