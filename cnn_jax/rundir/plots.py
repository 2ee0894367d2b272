"""Figures of a run with matplotlib: learning curves, conv1 filters, confusion matrix, misclassified images.

Each `*_figure` function returns a `matplotlib.figure.Figure` built without pyplot (no
global state, no GUI backend), so it can be shown in a notebook or saved. `write_run_plots`
saves all four as PNGs into `<workdir>/plots/`, each atomically.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.config import Config

PLOT_FILES = {
    "learning_curves": "learning_curves.png",
    "filters": "conv1_filters.png",
    "confusion": "confusion_matrix.png",
    "misclassified": "misclassified.png",
}


def run_label(config: Config) -> str:
    """A short description of a run for figure titles."""
    convs = "-".join(f"{f}x{k}" for f, k in zip(config.conv_filters, config.conv_kernels))
    return (f"{config.dataset}, conv {convs}, {config.pool} pool, {config.optimizer} "
            f"lr={config.learning_rate:g}, batch {config.batch_size}")


def learning_curves_figure(records: Sequence[dict[str, Any]], title: str = "") -> Figure:
    """Loss against training step (logged windows and per-epoch train/test, or train/validation for
    a search's trial) and accuracy per epoch."""
    train = [r for r in records if r.get("kind") == "train"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    if train:
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="0.6", lw=1,
                     label="train (mean over logged window)")
    if epochs:
        steps = [r["step"] for r in epochs]
        loss_ax.plot(steps, [r["train_loss"] for r in epochs], "o-", color="C0", label="train (epoch end)")
        done = [r["epoch"] + 1 for r in epochs]
        acc_ax.plot(done, [100 * r["train_accuracy"] for r in epochs], "o-", color="C0", label="train")
        split = workdir_lib.held_out_split(epochs[-1])   # test, or a search trial's validation split
        held = [r for r in epochs if workdir_lib.held_out_split(r) == split]
        loss_ax.plot([r["step"] for r in held], [r[f"{split}_loss"] for r in held], "s-", color="C1",
                     label=f"{split} (epoch end)")
        acc_ax.plot([r["epoch"] + 1 for r in held], [100 * r[f"{split}_accuracy"] for r in held], "s-", color="C1",
                    label=f"{split} (last: {100 * held[-1][f'{split}_accuracy']:.2f}%)")
        acc_ax.set_xticks(done if len(done) <= 12 else np.linspace(1, done[-1], 12).round())
    loss_ax.set(title="Cross-entropy loss", xlabel="training step", ylabel="loss (nats per image)")
    loss_ax.set_yscale("log")
    loss_ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    # Minor ticks labelled at 2, 3 and 5 times a power of ten only: readable, never crowded.
    loss_ax.yaxis.set_minor_formatter(FuncFormatter(
        lambda y, _: f"{y:g}" if y > 0 and f"{y:.0e}"[0] in "235" else ""))
    loss_ax.tick_params(axis="y", which="minor", labelsize=7)
    acc_ax.set(title="Accuracy", xlabel="epochs trained", ylabel="accuracy (%)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    return fig


def filters_figure(weights: np.ndarray, title: str = "First conv layer filters") -> Figure:
    """Filters of a conv layer, weights (k, k, C, F), as a grid on one symmetric colour scale.

    One input channel: a diverging map (red positive, blue negative) with a colour bar.
    Three channels: each filter as an RGB image, rescaled to [0, 1]. Otherwise the channel mean.
    """
    weights = np.asarray(weights, np.float32)
    k, _, channels, count = weights.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    # A fixed grid, not the constrained layout: laying out dozens of small axes costs seconds per figure.
    fig = Figure(figsize=(1.25 * cols + 1.2, 1.25 * rows + 0.8))
    fig.subplots_adjust(left=0.02, right=0.86, bottom=0.02, top=1 - 0.7 / (1.25 * rows + 0.8),
                        wspace=0.15, hspace=0.35)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    vmax = float(np.abs(weights).max()) or 1.0
    image = None
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= count:
            ax.set_axis_off()
            continue
        w = weights[:, :, :, i]
        if channels == 3:
            lo, hi = w.min(), w.max()
            ax.imshow((w - lo) / (hi - lo + 1e-12), interpolation="nearest")
        else:
            image = ax.imshow(w.mean(axis=-1), cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                              interpolation="nearest")
        ax.set_title(f"#{i + 1}", fontsize=8)
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.89, 0.1, 0.025, 0.7)), label="weight")
    fig.suptitle(f"{title} ({count} filters, {k}x{k}, {channels} input channel{'s' * (channels > 1)})")
    return fig


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str = "") -> Figure:
    """The confusion matrix: counts in the cells, colour = fraction of the true class."""
    confusion = np.asarray(confusion)
    n = len(class_names)
    totals = confusion.sum(axis=1, keepdims=True)
    fraction = confusion / np.maximum(totals, 1)
    size = max(5.0, 0.6 * n + 2.5)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if confusion[i, j]:
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if fraction[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45 if max(map(len, class_names)) > 2 else 0,
                  ha="right" if max(map(len, class_names)) > 2 else "center")
    ax.set_yticks(range(n), class_names)
    ax.set(xlabel="predicted class", ylabel="true class")
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    ax.set_title(title or f"Test confusion matrix: accuracy {100 * accuracy:.2f}% "
                          f"on {int(confusion.sum())} images")
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    return fig


def misclassified_figure(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                         class_names: Sequence[str], max_images: int = 25, title: str = "") -> Figure:
    """Up to `max_images` misclassified images, each titled with its true and predicted class."""
    wrong = np.flatnonzero(np.asarray(labels) != np.asarray(predictions))
    shown = wrong[:max_images]
    cols = min(5, max(len(shown), 1))
    rows = max(math.ceil(len(shown) / cols), 1)
    fig = Figure(figsize=(2.0 * cols, 2.2 * rows + 0.6))   # a fixed grid, as in filters_figure
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 1.0 / (2.2 * rows + 0.6),
                        wspace=0.1, hspace=0.45)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, shown):
        image = np.asarray(images[i])
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"true: {class_names[labels[i]]}\npred: {class_names[predictions[i]]}",
                     fontsize=9, color="C3")
    if not len(wrong):
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(title or f"Misclassified test images: {len(shown)} shown of {len(wrong)} errors "
                          f"among {len(labels)}")
    return fig


def save_figure(fig: Figure, path: str, dpi: int = 150) -> str:
    """Save `fig` as PNG via a temporary file + `os.replace` (never a half-written PNG).

    A failed write raises an OSError naming `path` (not the temporary file)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass   # not written, or the next start clears it (workdir.clear_leftovers)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise
    return path


def write_run_plots(folder: str, config: Config, records: Sequence[dict[str, Any]], filters: np.ndarray,
                    test_images: np.ndarray, test_labels: np.ndarray, predictions: np.ndarray,
                    confusion: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Write the four PNGs of a run into `folder`; return their paths. `filters` are the first conv
    layer's (kh, kw, in, out) weights (`model.first_conv`)."""
    os.makedirs(folder, exist_ok=True)
    label = run_label(config)
    figures = {
        "learning_curves": learning_curves_figure(records, title=label),
        "filters": filters_figure(np.asarray(filters),
                                  title=f"first conv layer filters, {config.model} on {config.dataset}"),
        "confusion": confusion_figure(confusion, class_names),
        "misclassified": misclassified_figure(test_images, test_labels, predictions, class_names),
    }
    return [save_figure(fig, os.path.join(folder, PLOT_FILES[name])) for name, fig in figures.items()]
