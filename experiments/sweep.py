"""Hyperparameter sweeps: one command, vectorised where shapes allow, resumable, with a results table.

    python experiments/sweep.py --data_dir=../shared/data/mnist --workdir=sweeps/lr_pool \\
        --sweep="learning_rate=0.003,0.01,0.03 pool=max,avg seed=0,1"
    python experiments/sweep.py ... --sweep_file=sweep.yaml        # a grid dict or a list of runs
    python experiments/sweep.py ... --shard=1/4                     # machine 1 of a 4-way job array
    python experiments/sweep.py --workdir=sweeps/lr_pool --summarize   # merge all shards' results

Takes every flag of experiments/train.py (the base config of every run). Each run gets
a run directory in --workdir named after its settings; rerunning the same command skips
finished runs. Results: --workdir/results.csv, results.md and results.png.

Runs are ranked by test accuracy, or with --validation_size=N by the accuracy on the last N
training images, which the runs then do not train on (the split of experiments/search.py:
select on validation, report the test accuracy of the selected run).
"""

import sys

from absl import app, flags, logging

from cnn_jax import cli
from cnn_jax import config as config_lib
from cnn_jax import sweep
from cnn_jax.config import ConfigError
from cnn_jax.data import sources as data

cli.define_config_flags()
flags.DEFINE_string("sweep", None, "Grid of runs: space-separated name=v1,v2,... terms, e.g. "
                    "\"learning_rate=0.003,0.01,0.03 pool=max,avg seed=0,1,2\" (list-valued flags join "
                    "a value's entries with ':', e.g. conv_filters=20:50,32:64).")
flags.DEFINE_string("sweep_file", None, "JSON or YAML file: a grid (flag -> list of values) or a list "
                    "of runs (flag -> value mappings).")
flags.DEFINE_string("workdir", None, "Sweep directory: one run directory per run, and the results.")
flags.DEFINE_integer("max_parallel", 0, "Most runs trained together in one vmapped program "
                     "(0: the fastest here: one at a time on CPU, as many as fit in a quarter of the free memory on accelerators).")
flags.DEFINE_string("shard", "0/1", "i/n: run only every n-th run starting at i (0-based), for job arrays.")
flags.DEFINE_boolean("summarize", False, "Only merge the finished runs of --workdir into the results files.")
flags.DEFINE_integer("validation_size", 0, "Hold out the last N training images: the runs do not train on "
                     "them and are ranked by their accuracy on them (0: no validation split, ranked on test).")
flags.DEFINE_boolean("dry_run", False, "Print the runs and groups that would train, then exit.")
FLAGS = flags.FLAGS


def print_summary(rows) -> None:
    finished = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} finished runs ({finished} ok, {len(rows) - finished} diverged) in {FLAGS.workdir}:")
    validated = sweep.ranked_by(rows) == "validation_accuracy"
    for e in sweep.summarize(rows)[:10]:
        settings = ",".join(f"{k}={sweep.format_value(tuple(v) if isinstance(v, list) else v)}"
                            for k, v in sorted(e["settings"].items())) or "(all)"
        mean, std = e["test_accuracy_mean"], e["test_accuracy_std"]
        shown = "n/a" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")
        val = e["validation_accuracy_mean"]
        ranked = (f"val acc {'n/a' if val is None else f'{val:.4f}'}  ") if validated else ""
        print(f"  {ranked}test acc {shown}  {settings}  ({e['ok']}/{e['runs']} runs)")
    print(f"tables: {FLAGS.workdir}/{sweep.RESULTS_MD}, {sweep.RESULTS_CSV}; plot: {sweep.RESULTS_PLOT}")


@cli.main_guard
def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint at INFO
    if not FLAGS.workdir:
        raise ConfigError("--workdir is required: the sweep keeps its run directories and results there")
    if FLAGS.summarize:
        rows = sweep.write_results(FLAGS.workdir)
        if not rows:
            raise ConfigError(f"--workdir={FLAGS.workdir} holds no finished sweep runs to summarize")
        print_summary(rows)
        return
    if (FLAGS.sweep is None) == (FLAGS.sweep_file is None):
        raise ConfigError("give exactly one of --sweep (a grid on one line) or --sweep_file")
    for name in ("max_parallel", "validation_size"):
        if FLAGS[name].value < 0:
            raise ConfigError(f"--{name}={FLAGS[name].value} is not allowed: give 0 or a positive count")
    index, count = sweep.parse_shard(FLAGS.shard)
    base = cli.config_from_flags()
    if base.num_processes > 1:
        raise ConfigError("a sweep runs on one process: drop --num_processes and split the grid with --shard")
    if FLAGS.sweep is not None:
        where, settings = "--sweep", sweep.grid_settings(sweep.parse_spec(FLAGS.sweep))
    else:
        where, settings = f"--sweep_file={FLAGS.sweep_file}", sweep.load_spec_file(FLAGS.sweep_file)
    for name in sorted(set.intersection(*(set(s) for s in settings))):
        if FLAGS[name].present:
            raise ConfigError(f"--{name} is given as a flag and swept by {where}: drop one of them")
    runs = sweep.make_runs(base, settings, where)
    selected = sweep.shard(runs, index, count)
    todo, done = sweep.pending_runs(FLAGS.workdir, selected, FLAGS.validation_size)
    max_parallel = FLAGS.max_parallel or sweep.default_max_parallel
    groups = sweep.group_runs(todo, max_parallel)
    shard_note = f" (shard {index}/{count}: {len(selected)} of them)" if count > 1 else ""
    print(f"sweep of {len(runs)} runs{shard_note}: {len(done)} already finished, {len(todo)} to train "
          f"in {len(groups)} group(s) of {', '.join(str(len(g)) for g in groups) or '-'} run(s) "
          f"(runs of a group train together as one vmapped program)",
          flush=True)
    print(sweep.describe_grouping(FLAGS.max_parallel), flush=True)
    if FLAGS.dry_run:
        for i, group in enumerate(groups):
            print(f"group {i}: " + "  ".join(r.name for r in group))
        return
    # Load every dataset before training anything: a data error stops the sweep before it starts.
    datasets, held_out = {}, {}   # by data key: training data, and the validation split (or None)
    for group in groups:
        key = sweep.data_key(group[0].config)
        if key not in datasets:
            datasets[key], held_out[key] = data.load(group[0].config), None
            if FLAGS.validation_size:
                datasets[key], *validation = data.hold_out(datasets[key], FLAGS.validation_size)
                held_out[key] = tuple(validation)
        n = len(datasets[key].train_labels)
        if group[0].config.batch_size > n:
            raise ConfigError(f"run {group[0].name}: --batch_size={group[0].config.batch_size} is larger "
                              f"than the {n} training images")
    programs = {}   # compiled once per program key and group size, reused by the later groups
    for i, group in enumerate(groups):
        print(f"group {i + 1}/{len(groups)}: {len(group)} run(s) together: "
              + "  ".join(r.name for r in group), flush=True)
        key = sweep.data_key(group[0].config)
        rows = sweep.run_group(FLAGS.workdir, group, datasets[key], print_fn=lambda line: print(line, flush=True),
                               validation=held_out[key], programs=programs)
        seconds = rows[0]["time_s"]
        print(f"group {i + 1}/{len(groups)} done in {seconds:.1f} s", flush=True)
        sweep.write_results(FLAGS.workdir)
    rows = sweep.write_results(FLAGS.workdir)
    if rows:
        print_summary(rows)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
