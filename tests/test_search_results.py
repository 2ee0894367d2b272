"""cnn_jax.search.results: the trials table, the best trial's command line, Optuna's figures."""

import csv
import io
import os

import matplotlib

matplotlib.use("Agg")

import optuna
import pytest

from cnn_jax import config as config_lib
from cnn_jax.search import results


@pytest.fixture
def study():
    """Four trials as workers leave them: two complete, one pruned, one failed (re-queued elsewhere)."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    pool = optuna.distributions.CategoricalDistribution(["max", "avg"])
    dists = {"learning_rate": lr, "pool": pool}
    for params, value, state, attrs in [
        ({"learning_rate": 0.01, "pool": "max"}, 0.9, optuna.trial.TrialState.COMPLETE,
         {"outcome": "complete", "test_accuracy": 0.88, "seconds": 3.0, "group_size": 2}),
        ({"learning_rate": 0.001, "pool": "avg"}, 0.7, optuna.trial.TrialState.COMPLETE,
         {"outcome": "complete", "test_accuracy": 0.69, "seconds": 3.0, "group_size": 2}),
        ({"learning_rate": 0.05, "pool": "max"}, None, optuna.trial.TrialState.PRUNED,
         {"outcome": "pruned", "seconds": 1.0, "group_size": 2}),
        ({"learning_rate": 0.0002, "pool": "avg"}, None, optuna.trial.TrialState.FAIL, {}),
    ]:
        study.add_trial(optuna.create_trial(state=state, value=value, params=params, distributions=dists,
                                            user_attrs=attrs,
                                            intermediate_values={1: 0.5} if value is None else {1: 0.5, 2: value}))
    return study


def test_the_trials_table_lists_every_trial_with_its_outcome(study):
    rows = results.trial_rows(study)
    assert [(r["number"], r["outcome"], r["value"]) for r in rows] == [
        (0, "complete", 0.9), (1, "complete", 0.7), (2, "pruned", None), (3, "failed", None)]
    table = list(csv.DictReader(io.StringIO(results.trials_csv(rows))))
    assert [t["outcome"] for t in table] == ["complete", "complete", "pruned", "failed"]
    assert table[0]["learning_rate"] == "0.01" and table[1]["pool"] == "avg" and table[2]["last_intermediate"] == "0.5"
    markdown = results.trials_markdown(rows, "validation_accuracy", "maximize", "python experiments/train.py")
    assert "# Search results (4 trials: 2 complete, 1 failed, 1 pruned)" in markdown
    assert "| 2 | pruned | 0.5 | 0.05 | max | 1 |" in markdown


def test_the_best_trial_becomes_a_train_command_of_the_non_default_flags(study):
    best = results.best_trial(study)
    assert best.number == 0
    config = config_lib.replace(config_lib.Config(), conv_filters=(8, 16), data_dir="../shared/data/mnist",
                                **best.params)
    command = results.train_command(config)
    assert command == ("python experiments/train.py --data_dir=../shared/data/mnist --conv_filters=8,16 "
                       "--learning_rate=0.01")


def test_results_files_and_figures_are_written(study, tmp_path):
    written = results.write_results(study, str(tmp_path), config_lib.Config(learning_rate=0.01), "validation_accuracy")
    assert written["figures"] == ["history.png", "importances.png", "parallel_coordinate.png"]
    for name in ("trials.csv", "trials.md", "best_command.txt", *written["figures"]):
        assert os.path.getsize(tmp_path / name) > 0, name
    with open(tmp_path / "best_command.txt") as f:
        assert f.read() == "python experiments/train.py --learning_rate=0.01\n"


def test_figures_that_need_more_trials_are_skipped(tmp_path):
    study = optuna.create_study(direction="maximize")
    assert results.write_figures(study, str(tmp_path)) == []
    study.add_trial(optuna.create_trial(value=0.5, params={"learning_rate": 0.01},
                                        distributions={"learning_rate": optuna.distributions.FloatDistribution(1e-3, 1)}))
    assert results.write_figures(study, str(tmp_path)) == ["history.png", "parallel_coordinate.png"]
    assert not os.path.exists(tmp_path / "importances.png")
