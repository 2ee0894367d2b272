"""Load times of MNIST through each source: the IDX files, TFDS's first preparation from the
official files (offline, as a manual download), a prepared TFDS copy read in one batch, and
the same copy read record by record through TFDS's TensorFlow-free data source.

    pip install -r requirements-tfds.txt
    python experiments/measure_data_load.py        # prints one JSON line of seconds (docs/data.md)

It prepares two TFDS copies under /tmp (tfds_measure, tfds_measure_ar) and replaces any there.
"""
import json
import os
import shutil
import sys
import time

from absl import app

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np

t = time.perf_counter()
import tensorflow  # noqa: E402,F401 - timed: what reading a TFDS copy first costs
import tensorflow_datasets as tfds  # noqa: E402
t_import = time.perf_counter() - t
tfds.disable_progress_bar()
from cnn_jax.data import sources as data  # noqa: E402

MNIST = os.path.join(data.SHARED_DATA_DIR, "mnist")


def best(fn, repeats=3):
    """The shortest of `repeats` wall times of fn(), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def data_source_loop(builder):
    """The former TFDS path: TensorFlow-free, every record decoded in Python."""
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        records = [source[i] for i in range(len(source))]
        np.stack([r["image"] for r in records])
        np.array([r["label"] for r in records])


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}: this script takes no flags", file=sys.stderr)
        sys.exit(2)
    out = {"import_tensorflow_and_tfds_s": t_import}
    out["idx_s"] = best(lambda: data.load_folder(MNIST, "mnist"))
    prepared = "/tmp/tfds_measure"
    shutil.rmtree(prepared, ignore_errors=True)
    start = time.perf_counter()
    data.load_tfds("mnist", data_dir=prepared, manual_dir=MNIST)
    out["tfds_first_preparation_s"] = time.perf_counter() - start
    out["tfds_prepared_one_batch_s"] = best(lambda: data.load_tfds("mnist", data_dir=prepared))
    prepared_ar = "/tmp/tfds_measure_ar"   # the data source reads array_record copies only
    shutil.rmtree(prepared_ar, ignore_errors=True)
    builder = tfds.builder("mnist", data_dir=prepared_ar, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MNIST),
                                 file_format="array_record")
    out["tfds_prepared_data_source_loop_s"] = best(lambda: data_source_loop(builder), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
