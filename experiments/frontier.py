"""Draw docs/frontier.png from docs/frontier.csv: every measured preset's test error against minutes
per run, both datasets, beside the published anchors (`cnn_jax.rundir.frontier`).

    python experiments/frontier.py                      # docs/frontier.csv -> docs/frontier.png
    python experiments/frontier.py --csv=mine.csv --output=mine.png
"""

import os

from absl import app, flags

from cnn_jax import cli
from cnn_jax.rundir import frontier, plots
from cnn_jax.rundir import workdir as workdir_lib

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
flags.DEFINE_string("csv", os.path.join(DOCS, "frontier.csv"), "The measured presets (one row each).")
flags.DEFINE_string("output", os.path.join(DOCS, "frontier.png"), "Where the figure goes (PNG).")
FLAGS = flags.FLAGS


@cli.main_guard
def main(argv: list[str]) -> None:
    del argv
    rows = frontier.read_rows(FLAGS.csv)
    try:
        plots.save_figure(frontier.frontier_figure(rows), FLAGS.output, dpi=110)
    except OSError as e:
        raise workdir_lib.write_error(e.filename or FLAGS.output, e) from None
    print(f"{FLAGS.output}: {len(rows)} presets")


if __name__ == "__main__":
    app.run(main)
