"""Test-set reports: accuracy, per-class accuracy and the confusion matrix, as numbers and text,
and a finished run's results.json and plots."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from cnn_jax import model
from cnn_jax.engine import evaluation
from cnn_jax.config import Config
from cnn_jax.data.sources import Dataset
from cnn_jax.rundir import plots, workdir as workdir_lib


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted] (int64, num_classes x num_classes)."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    return counts


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Fraction of each true class predicted correctly (NaN for a class with no examples)."""
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


def evaluate_test(params: Any, model_state: Any, dataset: Dataset, config: Config) -> dict[str, Any]:
    """Test loss, accuracy (the same numbers `train.fit` prints), predictions, confusion, per-class."""
    return summarize_test(evaluation.evaluate(params, model_state, jnp.asarray(dataset.test_images),
                                           jnp.asarray(dataset.test_labels), config, return_predictions=True), dataset)


def summarize_test(result: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    """An evaluation of the test set with its predictions, plus the confusion matrix and per-class accuracy."""
    confusion = confusion_matrix(dataset.test_labels, result["predictions"], dataset.num_classes)
    return {**result, "confusion": confusion, "per_class_accuracy": per_class_accuracy(confusion)}


def results_json(result: dict[str, Any], class_names: tuple[str, ...], step: int) -> dict[str, Any]:
    """The JSON-ready summary written to results.json."""
    return {
        "step": step, "test_loss": result["loss"], "test_accuracy": result["accuracy"],
        "num_test": int(result["confusion"].sum()),
        "per_class_accuracy": {name: (None if np.isnan(acc) else float(acc))
                               for name, acc in zip(class_names, result["per_class_accuracy"])},
        "class_names": list(class_names),
        "confusion_matrix": result["confusion"].tolist(),
    }


def write_results(workdir: str, config: Config, dataset: Dataset, result: dict[str, Any], params: Any,
                  step: int, records: Sequence[dict[str, Any]]) -> None:
    """A finished run's results.json and plots in `workdir`: `result` is the test set evaluated
    with predictions (`summarize_test`), `params` the weights it was evaluated with, `records`
    the run's metrics."""
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.RESULTS_FILE),
                           results_json(result, dataset.class_names, step))
    plots.write_run_plots(os.path.join(workdir, workdir_lib.PLOTS_DIR), config, records,
                          model.first_conv(params, config), dataset.test_images, dataset.test_labels,
                          result["predictions"], result["confusion"], dataset.class_names)


def format_per_class(result: dict[str, Any], class_names: tuple[str, ...]) -> str:
    """One line per class: name, accuracy, correct/total."""
    confusion = result["confusion"]
    width = max(len(n) for n in class_names)
    lines = ["per-class accuracy:"]
    for i, name in enumerate(class_names):
        total, right = int(confusion[i].sum()), int(confusion[i, i])
        acc = result["per_class_accuracy"][i]
        shown = "   n/a" if np.isnan(acc) else f"{acc:.4f}"
        lines.append(f"  {name:>{width}}  {shown}  ({right}/{total})")
    return "\n".join(lines)


def format_confusion(confusion: np.ndarray, class_names: tuple[str, ...]) -> str:
    """The confusion matrix as a text table: rows are true classes, columns predicted ones."""
    labels = [n if len(n) <= 6 else n[:5] + "." for n in class_names]
    width = max(max(len(n) for n in labels), len(str(int(confusion.max(initial=0)))))
    head = " " * (width + 2) + " ".join(f"{n:>{width}}" for n in labels)
    rows = [f"{labels[i]:>{width}}  " + " ".join(f"{int(v):>{width}}" for v in row)
            for i, row in enumerate(confusion)]
    return "\n".join(["confusion matrix (rows: true class, columns: predicted class):", head, *rows])
