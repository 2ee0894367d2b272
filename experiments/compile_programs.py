"""Compile one config's training program and evaluation batch from abstract data of MNIST's size,
in sequence on one thread, and list each program's trace, lower and XLA compile seconds: where a
cold run's compile time goes, without the overlap of a real run (which compiles them on a
background thread while drawing the initial params).

    python experiments/compile_programs.py --pool=max --nocompilation_cache
    python experiments/compile_programs.py --pool=avg --loop=step --nocompilation_cache

The config flags are train.py's; the programs are the ones `train.fit` compiles ahead
(`train.compile_ahead`). Without --nocompilation_cache a program already in the persistent cache is
loaded, not compiled (the last line counts the loads).
"""

import time

import numpy as np
from absl import app, flags, logging
from jax import monitoring

import compile_times   # experiments/, beside this script
from cnn_jax import cli
from cnn_jax.data import sources as data_lib
from cnn_jax.engine import train
from cnn_jax.config import ConfigError

cli.define_config_flags()
flags.DEFINE_integer("train_images", 60000, "Training set size the programs are compiled for.")
flags.DEFINE_integer("test_images", 10000, "Test set size the programs are compiled for.")
FLAGS = flags.FLAGS


def abstract_dataset(config, train_images: int, test_images: int) -> data_lib.Dataset:
    """A Dataset of the config's image shape whose arrays are zero-stride views: shapes and dtypes
    for compiling, no memory."""
    def images(n: int) -> np.ndarray:
        return np.broadcast_to(np.float32(0), (n, *config.input_shape))

    def labels(n: int) -> np.ndarray:
        return np.broadcast_to(np.int32(0), (n,))

    return data_lib.Dataset(config.dataset, images(train_images), labels(train_images), images(test_images),
                            labels(test_images), tuple(str(i) for i in range(config.num_classes)))


@cli.main_guard
def main(argv: list[str]) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = cli.config_from_flags()
    for name in ("train_images", "test_images"):
        if FLAGS[name].value < 1:
            raise ConfigError(f"--{name}={FLAGS[name].value} is not allowed: it must be positive")
    if FLAGS.train_images < config.batch_size:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than --train_images={FLAGS.train_images}")
    dataset = abstract_dataset(config, FLAGS.train_images, FLAGS.test_images)
    num_steps = train.steps_per_epoch(config, FLAGS.train_images)
    loop = train.resolve_loop(config)
    optimizer, runner = train.compiled_runner(config, num_steps * config.epochs, loop)
    log = compile_times.CompileLog()
    monitoring.register_event_duration_secs_listener(log.on_duration)
    monitoring.register_event_listener(log.on_event)
    start = time.perf_counter()
    train.compile_ahead(config, dataset, optimizer, runner, loop, num_steps)
    print(log.format(time.perf_counter() - start, wall_label="compiling wall"), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
