"""Recipes against the published figures: each preset's test error against minutes per run, both
datasets, beside the published anchors (docs/frontier.png, drawn by experiments/frontier.py).

A recipes CSV has one row per preset and dataset as docs/recipes.md measured it: the mean and
sample std of its test accuracy over its seeds, the minutes of one run (`minutes_are` says how they
were taken), the CPU and the commit. The anchors are the published figures the recipes are held
against (the Fashion-MNIST repository's benchmark table, the KMNIST repository's MNIST column,
the tutorial's published result). The figure is built without pyplot (`plots.py`'s rule).
"""

from __future__ import annotations

import csv
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cnn_jax.config import ConfigError

DATASETS = ("mnist", "fashion_mnist")
TITLES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
COLUMNS = ("preset", "dataset", "test_accuracy_mean", "test_accuracy_std", "seeds", "minutes",
           "minutes_are", "cpu", "commit")
# (label, test accuracy): published single models and ensembles the recipes are measured against.
ANCHORS = {
    "mnist": (("tutorial, published (1 epoch)", 0.9628), ("PreActResNet-18", 0.9956),
              ("ResNet18 + VGG ensemble", 0.9960), ("15-CNN ensemble, 25M augmented images", 0.9979)),
    "fashion_mnist": (("best 2-conv net < 100K params", 0.925), ("ResNet18", 0.949),
                      ("DenseNet-BC (768K params)", 0.954), ("WRN-28-10 + random erasing", 0.963)),
}


def read_rows(path: str) -> list[dict[str, Any]]:
    """The CSV's rows with numbers parsed; a missing column or a bad value is a one-line ConfigError."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ConfigError(f"--csv={path}: cannot read it ({e.strerror})") from None
    out = []
    for n, row in enumerate(rows, start=2):
        missing = [c for c in COLUMNS if not row.get(c)]
        if missing:
            raise ConfigError(f"{path} line {n}: no value for {', '.join(missing)}; every row needs {', '.join(COLUMNS)}")
        if row["dataset"] not in DATASETS:
            raise ConfigError(f"{path} line {n}: dataset {row['dataset']!r} is not one of {', '.join(DATASETS)}")
        try:
            numbers = {c: float(row[c]) for c in ("test_accuracy_mean", "test_accuracy_std", "minutes")}
            seeds = int(row["seeds"])
        except ValueError:
            raise ConfigError(f"{path} line {n}: test_accuracy_mean, test_accuracy_std and minutes must be "
                              "numbers and seeds a whole number") from None
        out.append({**row, **numbers, "seeds": seeds})
    return out


def frontier_figure(rows: Sequence[dict[str, Any]]) -> Figure:
    """One panel per dataset: each preset at (minutes per run, mean test error) with its std as an
    error bar, both axes logarithmic (0.4% against 0.2% error reads as twice, not as 0.002); the
    anchors as dashed lines, labelled alternately at the left and the right."""
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    for ax, dataset in zip(fig.subplots(1, len(DATASETS)), DATASETS):
        for i, r in enumerate(r for r in rows if r["dataset"] == dataset):
            ax.errorbar(r["minutes"], 100 * (1 - r["test_accuracy_mean"]), yerr=100 * r["test_accuracy_std"],
                        fmt="o", color=f"C{i}", capsize=3, label=f"{r['preset']} ({r['seeds']} seeds)")
        for j, (label, accuracy) in enumerate(ANCHORS[dataset]):
            ax.axhline(100 * (1 - accuracy), color="0.5", ls="--", lw=0.8)
            ax.annotate(f"{label} {100 * accuracy:.2f}%", (0.99 if j % 2 else 0.01, 100 * (1 - accuracy)),
                        xycoords=("axes fraction", "data"), ha="right" if j % 2 else "left", va="bottom",
                        fontsize=7, color="0.35")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(0.1, 60)
        for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_format(FuncFormatter(lambda y, _: f"{y:g}%"))
        ax.set(title=TITLES[dataset], xlabel="minutes per run (2-core CPU, log)", ylabel="test error (log)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, ncols=2, frameon=False)
    return fig
