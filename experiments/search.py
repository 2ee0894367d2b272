"""Hyperparameter search with Optuna: trials asked in batches and trained as vmapped groups.

    python experiments/search.py --data_dir=../shared/data/mnist --workdir=searches/lr \\
        --space="learning_rate=loguniform(1e-4,1e-1) momentum=uniform(0.5,0.99)" \\
        --optimizer=momentum --epochs=2 --trials=32 --batch=8 --pruner=median
    python experiments/search.py ... --space_file=space.yaml            # the space in a file
    python experiments/search.py ... --storage=postgresql://user@host/db # workers on many machines

Takes every flag of experiments/train.py (the base config of every trial). The study
lives in --storage (default: --workdir/study.db, SQLite); running the same command
again continues it, and after --trials trials it trains nothing. Any number of workers
may run the same command against one storage. Each trial keeps a run directory
(--workdir/trial_NNNNN); results: --workdir/trials.csv, trials.md, best_command.txt and
Optuna's figures (history.png, importances.png, parallel_coordinate.png). A worker rides out
its storage being unreachable for up to --storage_timeout seconds; after that it ends with one
line and exit status 75, and the same command run again reports what it had finished.

The objective (default validation accuracy) is measured on the last --validation_size
training images (default: a sixth of them), which the trials do not train on; the test
set is used only with --objective=test_accuracy or test_loss. --seed seeds the sampler
of the worker that creates the study as well as every trial's init and data order: one
worker with the same flags repeats a search (workers that join mix in their process id).
"""

import sys

import matplotlib

matplotlib.use("Agg")

from absl import app, flags, logging

from cnn_jax import cli, sweep
from cnn_jax.config import ConfigError
from cnn_jax.data import sources as data
from cnn_jax.engine import train
from cnn_jax.search import results as results_lib
from cnn_jax.search import space as space_lib
from cnn_jax.search import storage as storage_lib
from cnn_jax.search import study as study_lib
from cnn_jax.search import trials as trials_lib
from cnn_jax.search import worker as worker_lib

cli.define_config_flags()
flags.DEFINE_string("space", None, "Search space: space-separated terms name=loguniform(a,b) | uniform(a,b) | "
                    "int(a,b) | logint(a,b) | v1,v2,... (choices), e.g. \"learning_rate=loguniform(1e-4,1e-1) "
                    "momentum=uniform(0.5,0.99) optimizer=adam,momentum\".")
flags.DEFINE_string("space_file", None, "JSON or YAML file: a mapping of field to a distribution as in --space, "
                    "a list of choices, or {type, low, high}.")
flags.DEFINE_string("workdir", None, "Search directory: the study database (by default), the trials' run "
                    "directories and the results.")
flags.DEFINE_integer("trials", 16, "Trials of the whole study (all workers together).")
flags.DEFINE_integer("batch", 4, "Trials asked together; those that share shapes train as one vmapped program.")
flags.DEFINE_enum("sampler", "tpe", list(study_lib.SAMPLERS), "tpe (with constant_liar), random, or grid "
                  "(every combination of the choices and integer ranges).")
flags.DEFINE_enum("objective", "validation_accuracy", list(study_lib.OBJECTIVES),
                  "What the search optimises, at the end of each trial.")
flags.DEFINE_integer("validation_size", 0, "Validation images: the last N training images, which the trials "
                     "do not train on (0: a sixth of the training images).")
flags.DEFINE_enum("pruner", "none", list(study_lib.PRUNERS), "Stop bad trials early at evaluations: none, "
                  "median, or hyperband (successive halving).")
flags.DEFINE_integer("eval_every", 0, "Also evaluate (and maybe prune) every N steps within an epoch "
                     "(0: at epoch ends only).")
flags.DEFINE_string("storage", "", "SQL URL of the study's storage, e.g. postgresql://user:pw@host/db "
                    "(empty: SQLite in --workdir/study.db).")
flags.DEFINE_string("study_name", "search", "Name of the study in the storage.")
flags.DEFINE_integer("heartbeat_interval", 10, "Seconds between a worker's heartbeats for its trials.")
flags.DEFINE_integer("grace_period", 60, "Seconds without a heartbeat after which a trial's worker counts as "
                     "dead: its trial is marked failed and re-queued.")
flags.DEFINE_integer("storage_timeout", storage_lib.DEFAULT_TIMEOUT, "Seconds a worker rides out its storage "
                     "being unreachable (retrying, the trials training on); after that it ends with exit status "
                     f"{storage_lib.EXIT_STORAGE_UNAVAILABLE}, keeping what it finished for the next run.")
flags.DEFINE_integer("max_parallel", 0, "Most trials trained together in one vmapped program "
                     "(0: the fastest here: one at a time on CPU, as many as fit in a quarter of the free memory on accelerators).")
FLAGS = flags.FLAGS


def _space() -> space_lib.Space:
    if (FLAGS.space is None) == (FLAGS.space_file is None):
        raise ConfigError("give exactly one of --space (on the command line) or --space_file")
    return space_lib.parse(FLAGS.space) if FLAGS.space is not None else space_lib.load_file(FLAGS.space_file)


def _check_counts() -> None:
    for name in ("trials", "batch", "heartbeat_interval", "grace_period", "storage_timeout"):
        if FLAGS[name].value < 1:
            raise ConfigError(f"--{name}={FLAGS[name].value} is not allowed: it must be a positive integer")
    for name in ("validation_size", "eval_every", "max_parallel"):
        if FLAGS[name].value < 0:
            raise ConfigError(f"--{name}={FLAGS[name].value} is not allowed: it must be zero or positive")
    if FLAGS.grace_period <= FLAGS.heartbeat_interval:
        raise ConfigError(f"--grace_period={FLAGS.grace_period} must exceed --heartbeat_interval="
                          f"{FLAGS.heartbeat_interval}, or live workers would count as dead")


@cli.main_guard
def main(argv):
    """The search; a storage unreachable for longer than --storage_timeout ends it with one line
    and exit status 75 (EX_TEMPFAIL: run the same command again later)."""
    del argv
    try:
        _search()
    except storage_lib.StorageUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        cli.end_now(storage_lib.EXIT_STORAGE_UNAVAILABLE)   # no interpreter shutdown: no thread's echoes


def _search():
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint at INFO
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)   # this script prints its own lines
    if not FLAGS.workdir:
        raise ConfigError("--workdir is required: the search keeps its study, trials and results there")
    _check_counts()
    space = _space()
    base = cli.config_from_flags()
    if base.num_processes > 1:
        raise ConfigError("a search worker runs on one process: drop --num_processes and start more workers")
    where = "--space" if FLAGS.space is not None else f"--space_file={FLAGS.space_file}"
    for name in space:
        if FLAGS[name].present:
            raise ConfigError(f"--{name} is given as a flag and searched by {where}: drop one of them")
    space_lib.check_against(space, base, where)
    settings = study_lib.Settings(space, base, FLAGS.objective, FLAGS.validation_size, FLAGS.eval_every)
    total = FLAGS.trials
    if FLAGS.sampler == "grid":
        size = study_lib.grid_size(settings)
        if total > size:
            print(f"--sampler=grid: the grid has {size} points, so the study has {size} trials, not {total}")
            total = size
    url = FLAGS.storage or study_lib.default_storage(FLAGS.workdir)
    study_lib.check_search_dir(FLAGS.workdir, FLAGS.study_name, url)
    storage = study_lib.open_storage(url, FLAGS.heartbeat_interval, FLAGS.grace_period, FLAGS.storage_timeout)
    probe = data.load(base)   # a data error stops the search before any trial is asked
    train_part, _, _ = study_lib.split_validation(probe, settings)
    steps = train.steps_per_epoch(base, len(train_part.train_labels))
    evaluations = len(trials_lib.eval_steps(max(steps, 1), base.epochs, FLAGS.eval_every))
    study = study_lib.open_study(storage, FLAGS.study_name, settings,
                                 FLAGS.sampler, base.seed,
                                 study_lib.make_pruner(FLAGS.pruner, settings, evaluations))
    finished = study_lib.finished_count(study.get_trials(deepcopy=False))
    print(f"study {FLAGS.study_name!r}: {finished}/{total} trials finished; space {space_lib.describe(space)}; "
          f"objective {FLAGS.objective} ({len(train_part.train_labels)} training images"
          + ("" if FLAGS.objective.startswith("test_") else
             f", validation: the last {len(probe.train_labels) - len(train_part.train_labels)}") + ")", flush=True)

    print(sweep.describe_grouping(FLAGS.max_parallel), flush=True)

    def load_dataset(config):
        return probe if sweep.data_key(config) == sweep.data_key(base) else data.load(config)

    report = worker_lib.run_worker(study, storage, settings, FLAGS.workdir, total, FLAGS.batch, load_dataset,
                                   FLAGS.heartbeat_interval, FLAGS.max_parallel or sweep.default_max_parallel,
                                   print_fn=lambda line: print(line, flush=True))
    best = results_lib.best_trial(study)
    best_config = study_lib.trial_config(settings, best.params) if best is not None else None
    written = results_lib.write_results(study, FLAGS.workdir, best_config, FLAGS.objective)
    print(f"this worker trained {report.trained} trial(s) ({report.complete} complete, {report.pruned} pruned, "
          f"{report.diverged} diverged) in {report.seconds:.1f} s"
          + (f"; reported {report.reported} finished by an earlier run" if report.reported else ""), flush=True)
    if best is not None:
        print(f"best trial {best.number}: {FLAGS.objective}={best.value:.4f} "
              f"{space_lib.describe_params(best.params)}")
        print(f"as a training command: {written['command']}")
    print(f"tables: {FLAGS.workdir}/{results_lib.TRIALS_MD}, {results_lib.TRIALS_CSV}; figures: "
          + (", ".join(written["figures"]) or "none yet"))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
