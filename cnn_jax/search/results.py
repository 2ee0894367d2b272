"""A study's results: the trials table (CSV, Markdown), the best trial's command line, figures.

Figures are Optuna's matplotlib plots (optimisation history, parameter importances,
parallel coordinates); the caller chooses the matplotlib backend.
"""

from __future__ import annotations

import csv
import io
import os
import shlex
import warnings
from typing import Any, Sequence

import optuna

from cnn_jax import config as config_lib
from cnn_jax import sweep
from cnn_jax.rundir import workdir as workdir_lib
from cnn_jax.config import Config

TRIALS_CSV, TRIALS_MD, BEST_COMMAND = "trials.csv", "trials.md", "best_command.txt"
FIGURES = {"history": "history.png", "importances": "importances.png", "parallel": "parallel_coordinate.png"}


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, outcome, objective value, params and what the worker recorded."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        # A trial without an outcome was failed for its dead worker (and re-queued), or is still open.
        outcome = attrs.get("outcome") or {"FAIL": "failed"}.get(t.state.name, t.state.name.lower())
        rows.append({
            "number": t.number, "state": t.state.name, "outcome": outcome, "value": t.value,
            "params": dict(t.params), "evaluations": len(t.intermediate_values),
            "last_intermediate": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
            "test_accuracy": attrs.get("test_accuracy"), "seconds": attrs.get("seconds"),
            "group_size": attrs.get("group_size"), "worker": attrs.get("worker", ""),
            "run_dir": attrs.get("run_dir", ""),
        })
    return rows


def _param_names(rows: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in r["params"]})


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def trials_csv(rows: Sequence[dict[str, Any]]) -> str:
    names = _param_names(rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = ["number", "state", "outcome", "value", *names, "evaluations", "last_intermediate",
               "test_accuracy", "seconds", "group_size", "worker", "run_dir"]
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_fmt(r[c]) if c in r else _fmt(r["params"].get(c)) for c in columns])
    return out.getvalue()


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return study.best_trial if complete else None


def train_command(config: Config) -> str:
    """`python experiments/train.py` with a flag for every field that differs from the defaults."""
    defaults = Config()
    flags = []
    for name in config_lib.field_names():
        value = getattr(config, name)
        if value != getattr(defaults, name):
            text = ",".join(map(str, value)) if isinstance(value, tuple) else sweep.format_value(value)
            flags.append(f"--{name}={text}")
    return " ".join(["python", "experiments/train.py", *map(shlex.quote, flags)])


def trials_markdown(rows: Sequence[dict[str, Any]], objective: str, direction: str,
                    best_command: str | None, figures: Sequence[str] = ()) -> str:
    names = _param_names(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    lines = [f"# Search results ({len(rows)} trials: "
             + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")", "",
             f"Objective: {objective} ({direction}). Validation images are the last images of the training "
             "set (see cnn_jax/search/study.py); test accuracy is shown for completed trials and is not used "
             "to choose.", ""]
    if best_command:
        lines += ["## Best trial as a training command", "", "```", best_command, "```", "",
                  "(It trains on every training image, the validation images included.)", ""]
    lines += ["## Trials", "",
              "| " + " | ".join(["#", "outcome", objective, *names, "evals", "test acc", "time (s)",
                                 "group"]) + " |",
              "|" + "---|" * (len(names) + 7)]
    for r in rows:
        lines.append("| " + " | ".join([str(r["number"]), r["outcome"], _fmt(r["value"] if r["value"] is not None
                                                                         else r["last_intermediate"]),
                                        *[_fmt(r["params"].get(n)) for n in names], str(r["evaluations"]),
                                        _fmt(r["test_accuracy"]), _fmt(r["seconds"]),
                                        _fmt(r["group_size"])]) + " |")
    lines += ["", "The objective column of a pruned or diverged trial is its last reported value. "
              "Time is from its group's start to the trial's end (trials of a group train together)."]
    for name in figures:
        lines += ["", f"![{name}]({name})"]
    return "\n".join(lines) + "\n"


def write_figures(study: optuna.Study, folder: str) -> list[str]:
    """Optuna's history, importance and parallel-coordinate figures as PNGs; those that the trials
    cannot give yet (no completed trial; importances: fewer than two) are skipped."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm
    from cnn_jax.rundir import plots

    makers = {"history": ovm.plot_optimization_history, "importances": ovm.plot_param_importances,
              "parallel": ovm.plot_parallel_coordinate}
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    needs = {"history": 1, "importances": 2, "parallel": 1}   # completed trials each figure needs
    written = []
    for key, maker in makers.items():
        if complete < needs[key]:
            continue
        plt.close("all")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = maker(study)
                figure = getattr(axes, "figure", None) or plt.gcf()
                figure.tight_layout()   # Optuna's layout cuts long parameter names off
            plots.save_figure(figure, os.path.join(folder, FIGURES[key]))
            written.append(FIGURES[key])
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError):
            pass   # e.g. importances need two completed trials with different values
        finally:
            plt.close("all")
    return written


def write_results(study: optuna.Study, folder: str, best_config: Config | None, objective: str) -> dict[str, Any]:
    """Write trials.csv, trials.md, best_command.txt and the figures into `folder`; return a summary."""
    rows = trial_rows(study)
    workdir_lib.atomic_write_text(os.path.join(folder, TRIALS_CSV), trials_csv(rows))
    command = train_command(best_config) if best_config is not None else None
    if command:
        workdir_lib.atomic_write_text(os.path.join(folder, BEST_COMMAND), command + "\n")
    figures = write_figures(study, folder)
    direction = study.direction.name.lower()
    workdir_lib.atomic_write_text(os.path.join(folder, TRIALS_MD),
                                  trials_markdown(rows, objective, direction, command, figures))
    return {"rows": rows, "command": command, "figures": figures}
