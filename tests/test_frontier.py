"""cnn_jax/rundir/frontier.py (and experiments/frontier.py): the measured presets (docs/frontier.csv)
read and drawn against the published anchors; a bad CSV is one line."""

import os
import sys

import pytest
import script_runner

from cnn_jax.config import ConfigError
from cnn_jax.rundir import frontier

HEADER = ",".join(frontier.COLUMNS)


def test_the_docs_rows_parse_and_cover_both_datasets():
    rows = frontier.read_rows(os.path.join(script_runner.REPO_ROOT, "docs", "frontier.csv"))
    assert {r["dataset"] for r in rows} == set(frontier.DATASETS)
    for r in rows:
        assert 0.9 < r["test_accuracy_mean"] < 1 and 0 <= r["test_accuracy_std"] < 0.05
        assert r["seeds"] >= 3 and r["minutes"] > 0


def test_each_preset_is_a_point_with_its_spread_and_each_anchor_a_line():
    rows = [{"preset": "a", "dataset": "mnist", "test_accuracy_mean": 0.99, "test_accuracy_std": 0.001,
             "seeds": 3, "minutes": 2.0},
            {"preset": "b", "dataset": "fashion_mnist", "test_accuracy_mean": 0.93, "test_accuracy_std": 0.002,
             "seeds": 5, "minutes": 10.0}]
    fig = frontier.frontier_figure(rows)
    for ax, dataset, row in zip(fig.axes, frontier.DATASETS, rows):
        point, = ax.containers                     # one error bar per preset
        x, y = point.lines[0].get_data()
        assert x[0] == row["minutes"] and y[0] == pytest.approx(100 * (1 - row["test_accuracy_mean"]))
        anchors = [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == "--"]
        assert sorted(anchors) == pytest.approx(sorted(100 * (1 - a) for _, a in frontier.ANCHORS[dataset]))
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"{row['preset']} ({row['seeds']} seeds)"]


@pytest.mark.parametrize("text, message", [
    (f"{HEADER}\nx,mnist,0.99,0.001,3,,wall,cpu,abc\n", r"line 2: no value for minutes; every row needs preset"),
    (f"{HEADER}\nx,cifar,0.99,0.001,3,1,wall,cpu,abc\n", r"line 2: dataset 'cifar' is not one of mnist, fashion_mnist"),
    (f"{HEADER}\nx,mnist,high,0.001,3,1,wall,cpu,abc\n", r"line 2: .* must be numbers and seeds a whole number"),
])
def test_a_bad_row_is_one_line(tmp_path, text, message):
    path = tmp_path / "rows.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        frontier.read_rows(str(path))


def test_the_script_writes_the_figure_and_refuses_a_missing_csv(tmp_path):
    output = tmp_path / "frontier.png"
    done = script_runner.run([sys.executable, "experiments/frontier.py", f"--output={output}"])
    assert done.returncode == 0, done.stderr
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = script_runner.run([sys.executable, "experiments/frontier.py", f"--csv={tmp_path}/none.csv",
                                 f"--output={output}"])
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith(f"error: --csv={tmp_path}/none.csv: cannot read it")
