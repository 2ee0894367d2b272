"""Train a CNN on MNIST / Fashion-MNIST.

    python experiments/train.py --pool=max --data_dir=../shared/data/mnist
    python experiments/train.py --preset=seed          # the MXNet tutorial exactly
"""

from absl import app, flags

from cnn_jax import cli, train

cli.define_config_flags()
flags.DEFINE_string("workdir", None, "Run directory for config, metrics, checkpoints and plots.")
FLAGS = flags.FLAGS


@cli.main_guard
def main(argv):
    del argv
    config = cli.config_from_flags()
    train.train_and_evaluate(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
