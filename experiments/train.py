"""Train a CNN on a dataset of the registry (MNIST by default; cnn_jax/data/registry.py).

    python experiments/train.py --pool=max            # data: the first source found (cnn_jax/data/sources.py)
    python experiments/train.py --pool=max --data_dir=../shared/data/mnist
    python experiments/train.py --preset=tutorial      # the MXNet tutorial exactly
    python experiments/train.py --workdir=runs/max --epochs=2        # keep the run (see WORKSPACE.md)
    python experiments/train.py --workdir=runs/max --resume          # continue it after a stop
    python experiments/train.py --pool=max --seeds=0-9   # ten seeds: each one's final metrics, then their
                                                         # mean, std, min and max (cnn_jax/sweep/seeds.py)

SIGINT / SIGTERM save a checkpoint of the current step and exit with status 128 + signal.
"""

import sys

from absl import app, flags, logging

from cnn_jax import cli, config as config_lib, run, sweep
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import parallel
from cnn_jax.rundir import signals
from cnn_jax.rundir import workdir as workdir_lib

cli.define_config_flags()
flags.DEFINE_string("workdir", None, "Run directory for config, metrics, checkpoints and plots.")
flags.DEFINE_boolean("resume", False, "Continue the latest checkpoint of --workdir (its config.json "
                     "is the config; only flags that do not change the computation may be given).")
flags.DEFINE_boolean("overwrite", False, "Delete the run already in --workdir and start a new one.")
flags.DEFINE_string("seeds", None, "Train the config on each of these seeds (a range or a list: 0-9, "
                    "0,1,2) as a sweep group, then print the mean, std, min and max of every final metric.")
flags.DEFINE_boolean("tensorboard", False, "Also write TensorBoard scalars into --workdir/tensorboard.")
FLAGS = flags.FLAGS


@cli.main_guard
def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # orbax logs every checkpoint step at INFO
    config = cli.config_from_flags()
    if FLAGS.workdir and config.num_processes > 1:
        raise config_lib.ConfigError("--workdir is single-process only: drop it for a run with "
                                     f"--num_processes={config.num_processes}")
    if FLAGS.seeds is not None:
        seeds = sweep.parse_seeds(FLAGS.seeds)
        if FLAGS["seed"].present:
            raise config_lib.ConfigError("--seed and --seeds cannot be combined: give the seeds in --seeds")
        if FLAGS.workdir or FLAGS.resume or FLAGS.overwrite or FLAGS.tensorboard or config.num_processes > 1:
            raise config_lib.ConfigError(
                "--seeds trains in one process without a --workdir: to keep the runs, use experiments/sweep.py "
                f"--sweep=seed={','.join(map(str, seeds))} --workdir=DIR")
        dataset = data_lib.load(config)
        print(f"data: {dataset.source}", flush=True)
        sweep.train_seeds(config, seeds, dataset, print_fn=lambda line: print(line, flush=True))
        return
    parallel.initialize(config)   # multi-host: before any other JAX call
    if (FLAGS.resume or FLAGS.overwrite or FLAGS.tensorboard) and not FLAGS.workdir:
        raise config_lib.ConfigError("--resume, --overwrite and --tensorboard need --workdir")
    if FLAGS.resume:
        if FLAGS["preset"].present:
            raise config_lib.ConfigError("--preset cannot be combined with --resume: a resumed run "
                                         "keeps the config.json of its --workdir")
        present = [name for name in config_lib.field_names() if FLAGS[name].present]
        config = workdir_lib.resume_config(FLAGS.workdir, config, present)
    try:
        run.train_and_evaluate(config, FLAGS.workdir, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
                               tensorboard=FLAGS.tensorboard)
    except signals.Interrupted as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.exit_status)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
