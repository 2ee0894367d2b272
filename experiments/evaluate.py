"""Evaluate a saved run: test accuracy, per-class accuracy and the confusion matrix.

    python experiments/evaluate.py --workdir=runs/max
    python experiments/evaluate.py --workdir=runs/max --step=1874        # an older checkpoint
    python experiments/evaluate.py --workdir=copied_run --data_dir=path/to/mnist   # from another machine
    python experiments/evaluate.py --workdir=runs/bf16 --compute_dtype=float32     # in the other dtype
    python experiments/evaluate.py --workdir=runs/fashion --notta_flip             # without flip-averaging

Everything is rebuilt from the run's config.json and checkpoint; the test accuracy is
the one training printed for the checkpoint's epoch (same numbers on the same machine).
"""

from absl import app, flags, logging

from cnn_jax import cli
from cnn_jax import config as config_lib
from cnn_jax.data import sources as data
from cnn_jax.rundir import checkpoint, report

flags.DEFINE_string("workdir", None, "Run directory written by experiments/train.py --workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_string("data_dir", None, "Replaces the run's --data_dir (e.g. a run trained elsewhere).")
flags.DEFINE_enum("compute_dtype", None, list(config_lib.COMPUTE_DTYPES),
                  "Replaces the run's --compute_dtype: a checkpoint trained in one evaluates in the other "
                  "(params are float32 either way).")
flags.DEFINE_boolean("tta_flip", None, "Replaces the run's --tta_flip: evaluate with (--tta_flip) or without "
                     "(--notta_flip) the average of each image's and its mirror's predictions.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def describe_checkpoint(meta: dict) -> str:
    """`step 64 (end of epoch 1)` or `step 40 (epoch 1, 8/32 steps)`."""
    step, per_epoch = meta["step"], meta["steps_per_epoch"]
    if step % per_epoch == 0:
        return f"step {step} (end of epoch {step // per_epoch - 1})"
    return f"step {step} (epoch {step // per_epoch}, {step % per_epoch}/{per_epoch} steps: interrupted)"


@cli.main_guard
def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config, state, meta = checkpoint.restore_run(FLAGS.workdir, FLAGS.step, FLAGS.data_dir)
    if FLAGS.compute_dtype:
        config = config_lib.replace(config, compute_dtype=FLAGS.compute_dtype)
    if FLAGS.tta_flip is not None:
        config = config_lib.replace(config, tta_flip=FLAGS.tta_flip)
    dataset = data.load(config)
    result = report.evaluate_test(state.params, state.model_state, dataset, config)
    n = len(dataset.test_labels)
    correct = int(result["confusion"].trace())
    print(f"run {FLAGS.workdir}: checkpoint {describe_checkpoint(meta)}, "
          f"{config.dataset} test set of {n} images" + (", flip-averaged" if config.tta_flip else ""))
    print(f"Test_acc {result['accuracy']:.4f} ({correct}/{n}; exactly {result['accuracy']!r}), "
          f"test loss {result['loss']:.4f}")
    print(report.format_per_class(result, dataset.class_names))
    print(report.format_confusion(result["confusion"], dataset.class_names))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
