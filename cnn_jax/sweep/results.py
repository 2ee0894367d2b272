"""The results of a sweep: its finished runs' rows, the summary over seeds, and the tables and
plot written into the sweep directory."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from cnn_jax.rundir import plots
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.sweep.rundirs import SWEEP_RESULT_FILE, read_row
from cnn_jax.sweep.spec import field_kind, format_value

RESULTS_CSV, RESULTS_MD, RESULTS_PLOT = "results.csv", "results.md", "results.png"


def collect_rows(sweep_dir: str) -> list[dict[str, Any]]:
    """The result rows of every finished run directory in `sweep_dir` (all shards), by name."""
    rows = []
    if not os.path.isdir(sweep_dir):
        return rows
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name, SWEEP_RESULT_FILE)
        if os.path.isfile(path):
            rows.append(read_row(path))
    return rows


def swept_fields(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every field set by some run, sorted."""
    return sorted({k for row in rows for k in row["settings"]})


def ranked_by(rows: Sequence[dict[str, Any]]) -> str:
    """The metric that ranks the runs: validation accuracy when the sweep held out a validation
    split (`--validation_size`), else test accuracy."""
    return "validation_accuracy" if any(r.get("validation_accuracy") is not None for r in rows) else "test_accuracy"


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped over seeds: mean and sample std of the final metrics of the runs that finished,
    sorted by the mean of `ranked_by(rows)` (best first)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    settings_of: dict[str, dict[str, Any]] = {}
    for row in rows:
        settings = {k: v for k, v in row["settings"].items() if k != "seed"}
        key = json.dumps(settings, sort_keys=True)
        groups.setdefault(key, []).append(row)
        settings_of[key] = settings
    out = []
    for key, members in groups.items():
        ok = [m for m in members if m["status"] == "ok"]
        entry = {"settings": settings_of[key], "runs": len(members), "ok": len(ok),
                 "seeds": [m["settings"].get("seed") for m in members]}
        for metric in ("test_accuracy", "train_accuracy", "test_loss", "train_loss", "validation_accuracy"):
            values = np.array([m[metric] for m in ok if m.get(metric) is not None], np.float64)
            entry[f"{metric}_mean"] = float(values.mean()) if len(values) else None
            entry[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        out.append(entry)
    rank = f"{ranked_by(rows)}_mean"
    out.sort(key=lambda e: -1.0 if e[rank] is None else e[rank], reverse=True)
    return out


def _settings_text(settings: dict[str, Any], fields: Sequence[str]) -> list[str]:
    return [format_value(tuple(settings[f]) if isinstance(settings.get(f), list) else settings[f])
            if f in settings else "" for f in fields]


def _num(value: Any, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    """One line per run: its settings, status, epochs finished (`epochs_done`: a swept `epochs` is
    the number asked for), final metrics, time."""
    fields = swept_fields(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    metrics = ["train_loss", "train_accuracy", "test_loss", "test_accuracy", "validation_loss",
               "validation_accuracy", "moving_loss"]
    writer.writerow(["name", *fields, "status", "epochs_done", *metrics, "time_s", "group_size", "message"])
    for row in rows:
        writer.writerow([row["name"], *_settings_text(row["settings"], fields), row["status"], row["epochs"],
                         *["" if row.get(m) is None else repr(row[m]) for m in metrics],
                         f"{row['time_s']:.2f}", row["group_size"], row["message"]])
    return out.getvalue()


def results_markdown(rows: Sequence[dict[str, Any]], plot_name: str | None = RESULTS_PLOT) -> str:
    """The summary over seeds (best first) and every run, as Markdown tables."""
    fields = swept_fields(rows)
    group_fields = [f for f in fields if f != "seed"]
    lines = [f"# Sweep results ({len(rows)} runs)", ""]
    validated = ranked_by(rows) == "validation_accuracy"
    val_head = ["val acc mean"] if validated else []
    lines += [f"## Summary over seeds (sorted by mean {'validation' if validated else 'test'} accuracy)", "",
              "| " + " | ".join([*group_fields, "runs", *val_head, "test acc mean", "test acc std",
                                 "train acc mean", "test loss mean"]) + " |",
              "|" + "---|" * (len(group_fields) + 5 + len(val_head))]
    for e in summarize(rows):
        runs = f"{e['ok']}/{e['runs']}" if e["ok"] != e["runs"] else str(e["runs"])
        lines.append("| " + " | ".join([*_settings_text(e["settings"], group_fields), runs,
                                        *([_num(e["validation_accuracy_mean"])] if validated else []),
                                        _num(e["test_accuracy_mean"]), _num(e["test_accuracy_std"]),
                                        _num(e["train_accuracy_mean"]), _num(e["test_loss_mean"])]) + " |")
    lines += ["", "## Runs", "",
              "| " + " | ".join([*fields, "status", "train loss", "train acc", *(["val acc"] if validated else []),
                                 "test loss", "test acc", "time (s)", "runs together"]) + " |",
              "|" + "---|" * (len(fields) + 7 + len(val_head))]
    for row in rows:
        lines.append("| " + " | ".join([*_settings_text(row["settings"], fields), row["status"],
                                        _num(row["train_loss"]), _num(row["train_accuracy"]),
                                        *([_num(row.get("validation_accuracy"))] if validated else []),
                                        _num(row["test_loss"]), _num(row["test_accuracy"]),
                                        f"{row['time_s']:.1f}", str(row["group_size"])]) + " |")
    lines += ["", "Time is the wall-clock time of the run's group: runs trained together (vmapped) share it.",
              "Std is the sample standard deviation over seeds."]
    if plot_name:
        lines += ["", f"![test accuracy]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot_axis(rows: Sequence[dict[str, Any]]) -> str | None:
    """The field on the plot's x axis: the numeric swept field (not seed) with the most values,
    else any swept field but seed with several values, else seed."""
    fields = swept_fields(rows)
    counts = {f: len({json.dumps(r["settings"].get(f)) for r in rows}) for f in fields}
    numeric = [f for f in fields if f != "seed" and field_kind(f) in (int, float) and counts[f] > 1]
    if numeric:
        return max(numeric, key=lambda f: (counts[f], f == "learning_rate"))
    others = [f for f in fields if f != "seed" and counts[f] > 1]
    if others:
        return others[0]
    return "seed" if "seed" in fields else None


def results_figure(rows: Sequence[dict[str, Any]]):
    """Test accuracy (mean over seeds, std as error bars) against the swept value, one line per
    combination of the other swept settings."""
    from matplotlib.figure import Figure   # no pyplot: no backend, no global figure state

    x_field = plot_axis(rows)
    fields = [f for f in swept_fields(rows) if f not in ("seed", x_field)]
    numeric = x_field is not None and field_kind(x_field) in (int, float)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    ok = [r for r in rows if r["status"] == "ok"]
    # Runs of another sweep kept in the same folder may lack the x field: they are in the tables only.
    plotted = [r for r in ok if x_field is None or x_field in r["settings"]]
    series: dict[str, dict[Any, list[float]]] = {}
    for r in plotted:
        label = ", ".join(t for t in _settings_text(r["settings"], fields) if t) or "all runs"
        x = r["settings"].get(x_field) if x_field else 0
        x = tuple(x) if isinstance(x, list) else x
        series.setdefault(label, {}).setdefault(x, []).append(r["test_accuracy"])
    categories = sorted({x for s in series.values() for x in s}, key=lambda v: (str(type(v)), v))
    log_x = bool(numeric and categories and min(categories) > 0 and max(categories) / min(categories) >= 10)
    for k, (label, points) in enumerate(sorted(series.items())):
        xs = sorted(points, key=lambda v: (str(type(v)), v))
        means = [float(np.mean(points[x])) for x in xs]
        stds = [float(np.std(points[x], ddof=1)) if len(points[x]) > 1 else 0.0 for x in xs]
        # Lines are nudged sideways a little so that their error bars do not hide each other.
        nudge = (k - (len(series) - 1) / 2) * 0.015
        if not numeric:
            pos = [categories.index(x) + nudge * 4 for x in xs]
        elif log_x:
            pos = [x * 10 ** (nudge * math.log10(max(categories) / min(categories))) for x in xs]
        else:
            pos = [x + nudge * (max(categories) - min(categories)) for x in xs]
        ax.errorbar(pos, means, yerr=stds, marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    if categories:
        ax.set_xticks(categories if numeric else range(len(categories)),
                      [format_value(c) for c in categories])
        ax.minorticks_off()
    n_seeds = max((len(v) for s in series.values() for v in s.values()), default=1)
    ax.set_xlabel(x_field or "")
    ax.set_ylabel("final test accuracy" + (f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else ""))
    failed = len(rows) - len(ok)
    ax.set_title(f"Sweep: test accuracy vs {x_field} ({len(plotted)} runs"
                 + (f", {failed} diverged" if failed else "") + ")")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small", title=", ".join(fields) if fields else None, title_fontsize="small")
    return fig


def write_results(sweep_dir: str, rows: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Write results.csv, results.md and results.png (each atomically) from `rows` (default: every
    finished run directory of `sweep_dir`); return the rows."""
    rows = collect_rows(sweep_dir) if rows is None else list(rows)
    if not rows:
        return rows
    try:
        workdir_lib.atomic_write_text(os.path.join(sweep_dir, RESULTS_CSV), results_csv(rows))
        workdir_lib.atomic_write_text(os.path.join(sweep_dir, RESULTS_MD), results_markdown(rows))
        plots.save_figure(results_figure(rows), os.path.join(sweep_dir, RESULTS_PLOT))
    except OSError as e:
        failed = workdir_lib.write_error(e.filename or sweep_dir, e)
        raise workdir_lib.WriteError(f"{failed}; every finished run's own files are kept: make room and "
                                     "write the tables again with --summarize") from None
    return rows
