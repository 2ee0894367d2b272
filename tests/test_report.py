"""Confusion matrix, per-class accuracy and their text tables."""

import numpy as np

from cnn_jax.rundir import report


def test_confusion_and_per_class_accuracy_by_hand():
    labels = np.array([0, 0, 1, 1, 1, 2])
    predictions = np.array([0, 1, 1, 1, 0, 1])
    confusion = report.confusion_matrix(labels, predictions, 4)
    assert confusion.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    accuracy = report.per_class_accuracy(confusion)
    assert accuracy[:3].tolist() == [0.5, 2 / 3, 0.0] and np.isnan(accuracy[3])


def test_tables_name_the_classes():
    labels, predictions = np.array([0, 1, 1]), np.array([0, 1, 0])
    confusion = report.confusion_matrix(labels, predictions, 2)
    result = {"confusion": confusion, "per_class_accuracy": report.per_class_accuracy(confusion),
              "loss": 0.1, "accuracy": 2 / 3}
    names = ("T-shirt/top", "Trouser")
    assert report.format_per_class(result, names).splitlines()[1:] == [
        "  T-shirt/top  1.0000  (1/1)", "      Trouser  0.5000  (1/2)"]
    table = report.format_confusion(confusion, names)
    assert table.splitlines()[1].split() == ["T-shi.", "Trous."]
    assert table.splitlines()[3].split() == ["Trous.", "1", "1"]
    summary = report.results_json(result, names, step=9)
    assert summary["per_class_accuracy"] == {"T-shirt/top": 1.0, "Trouser": 0.5}
    assert summary["confusion_matrix"] == [[1, 0], [1, 1]] and summary["num_test"] == 3
