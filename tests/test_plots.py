"""Plots: every figure has its title, axis labels and class names, and is written as a real PNG."""

import os

import numpy as np

from cnn_jax.rundir import plots
from cnn_jax.config import Config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def records():
    train = [{"kind": "train", "step": s, "epoch": (s - 1) // 10, "loss": 2.0 / s, "moving_loss": 2.0,
              "images_per_second": 1000.0} for s in range(2, 21, 2)]
    epochs = [{"kind": "epoch", "epoch": e, "step": 10 * (e + 1), "train_loss": 0.5 / (e + 1),
               "test_loss": 0.6 / (e + 1), "train_accuracy": 0.8 + 0.05 * e, "test_accuracy": 0.78 + 0.05 * e}
              for e in range(2)]
    return train + epochs


def texts(fig):
    """Every title, axis label and tick label of a figure."""
    out = [fig.get_suptitle()]
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        legend = ax.get_legend()
        if legend:
            out += [t.get_text() for t in legend.get_texts()]
    return [t for t in out if t]


def test_learning_curves_show_loss_by_step_and_accuracy_by_epoch():
    fig = plots.learning_curves_figure(records(), title="mnist run")
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_xlabel() == "training step" and "loss" in loss_ax.get_ylabel()
    assert acc_ax.get_xlabel() == "epochs trained" and acc_ax.get_ylabel() == "accuracy (%)"
    assert fig.get_suptitle() == "mnist run"
    assert "test (last: 83.00%)" in texts(fig)
    train_line = loss_ax.get_lines()[0]
    assert list(train_line.get_xdata()) == list(range(2, 21, 2))
    np.testing.assert_allclose(acc_ax.get_lines()[1].get_ydata(), [78.0, 83.0])


def test_a_search_trials_curves_show_its_validation_split():
    """A search's trial evaluates a validation split, not the test set: its epoch records (and
    evaluation records, which the curves pass over) say so, and so does the figure."""
    trial = [{**{k: v for k, v in r.items() if not k.startswith("test_")},
              **({"validation_loss": r["test_loss"], "validation_accuracy": r["test_accuracy"]}
                 if r["kind"] == "epoch" else {})} for r in records()]
    trial.append({"kind": "evaluation", "evaluation": 1, "step": 10, "epoch": 0, "validation_loss": 0.6,
                  "validation_accuracy": 0.78})
    fig = plots.learning_curves_figure(trial)
    assert "validation (last: 83.00%)" in texts(fig) and not any("test" in t for t in texts(fig))
    np.testing.assert_allclose(fig.axes[1].get_lines()[1].get_ydata(), [78.0, 83.0])


def test_filters_grid_shows_every_filter_on_one_scale():
    weights = np.random.default_rng(0).normal(size=(5, 5, 1, 20)).astype(np.float32)
    fig = plots.filters_figure(weights, title="conv1 filters")
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(images) == 20 and "20 filters, 5x5" in fig.get_suptitle()
    np.testing.assert_array_equal(images[3].get_array(), weights[:, :, 0, 3])
    assert {im.get_clim() for im in images} == {(-np.abs(weights).max(), np.abs(weights).max())}
    assert "weight" in texts(fig)


def test_confusion_matrix_names_classes_on_both_axes():
    confusion = np.diag(np.arange(10, 20))
    confusion[3, 6] = 4
    fig = plots.confusion_figure(confusion, FASHION)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(FASHION)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(FASHION)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert "accuracy" in ax.get_title()
    assert "4" in [t.get_text() for t in ax.texts]


def test_misclassified_grid_titles_true_and_predicted_names():
    images = np.random.default_rng(0).random((40, 28, 28, 1))
    labels = np.arange(40) % 10
    predictions = labels.copy()
    predictions[[3, 7]] = [9, 0]
    fig = plots.misclassified_figure(images, labels, predictions, FASHION)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true: Dress\npred: Ankle boot", "true: Sneaker\npred: T-shirt/top"]
    assert "2 shown of 2 errors among 40" in fig.get_suptitle()
    none = plots.misclassified_figure(images, labels, labels, FASHION)
    assert "no misclassified images" in [t.get_text() for t in none.axes[0].texts]


def test_write_run_plots_writes_four_real_pngs(tmp_path):
    rng = np.random.default_rng(0)
    filters = rng.normal(size=(3, 3, 1, 8)).astype(np.float32)
    labels = np.arange(50) % 10
    predictions = (labels + (np.arange(50) % 7 == 0)) % 10
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, predictions), 1)
    paths = plots.write_run_plots(str(tmp_path / "plots"), Config(), records(), filters, rng.random((50, 28, 28, 1)),
                                  labels, predictions, confusion, [str(i) for i in range(10)])
    assert sorted(os.path.basename(p) for p in paths) == sorted(plots.PLOT_FILES.values())
    for path in paths:
        data = open(path, "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert sorted(os.listdir(tmp_path / "plots")) == sorted(plots.PLOT_FILES.values())


def test_rgb_filters_are_drawn_in_colour():
    weights = np.random.default_rng(1).normal(size=(3, 3, 3, 4))
    fig = plots.filters_figure(weights)
    assert fig.axes[0].get_images()[0].get_array().shape == (3, 3, 3)
