"""Draw the plots of a saved run into <workdir>/plots/ (training draws them too, at its end).

    python experiments/plot.py --workdir=runs/max
    python experiments/plot.py --workdir=copied_run --data_dir=path/to/mnist

Learning curves come from metrics.jsonl; the conv1 filters, the test confusion matrix
and the misclassified test images from the latest (or --step) checkpoint. The run
directory's lock is held throughout (cnn_jax.rundir.lock): while a training or another plot.py
writes there, it stops with one line naming that process.
"""

import os

from absl import app, flags, logging

from cnn_jax import cli, model
from cnn_jax.data import sources as data
from cnn_jax.rundir import checkpoint, lock, plots, report
from cnn_jax.rundir import workdir as workdir_lib

flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py --workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step to plot (default: the latest).")
flags.DEFINE_string("data_dir", None, "Replaces the run's --data_dir (e.g. a run trained elsewhere).")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


@cli.main_guard
def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if os.path.isfile(FLAGS.workdir):
        workdir_lib.read_config(FLAGS.workdir)   # the one-line error for a file given as --workdir
    with lock.hold(FLAGS.workdir, create=False):
        config, state, _ = checkpoint.restore_run(FLAGS.workdir, FLAGS.step, FLAGS.data_dir)
        records = workdir_lib.read_metrics(FLAGS.workdir)   # a damaged file fails before the evaluation
        dataset = data.load(config)
        result = report.evaluate_test(state.params, state.model_state, dataset, config)
        try:
            paths = plots.write_run_plots(
                os.path.join(FLAGS.workdir, workdir_lib.PLOTS_DIR), config, records, model.first_conv(state.params, config),
                dataset.test_images, dataset.test_labels, result["predictions"], result["confusion"],
                dataset.class_names)
        except OSError as e:
            failed = workdir_lib.write_error(e.filename or FLAGS.workdir, e)
            raise workdir_lib.WriteError(f"{failed}; the run's checkpoints, metrics and results are "
                                         "untouched (plots already there are whole)") from None
    for path in paths:
        print(path)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
