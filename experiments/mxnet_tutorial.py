"""The MXNet tutorial "Convolutional neural networks from scratch" as it was written, on the official
MNIST files: which seeds its recipe learns on, to set beside `--preset=tutorial` (docs/recipes.md).

MXNet is not a dependency of cnn_jax: run this in an environment of its own, e.g.

    python3 -m venv /tmp/mxnet && /tmp/mxnet/bin/pip install mxnet==1.9.1 numpy==1.23.5
    /tmp/mxnet/bin/python experiments/mxnet_tutorial.py --data_dir=../shared/data/mnist --seeds=0,1,2

The network, init, loss, SGD update, moving loss and the epoch line are the tutorial's code
(nd.Convolution 3x3x20 and 5x5x50, average pooling 2x2, a 128-unit dense layer, every weight and
bias ~ N(0, 0.01), the summed per-example softmax cross-entropy, p <- p - 0.01 * grad, batch 64
with the last partial batch kept, one epoch); only the data is read from the IDX files instead of
downloaded, and the seeds are set (`mx.random.seed` for the init, `np.random.seed` for the shuffle).
"""

from __future__ import annotations

import argparse
import gzip
import os

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(data_dir: str, split: str) -> gluon.data.ArrayDataset:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"))
    return gluon.data.ArrayDataset(nd.array(images[:, None].astype(np.float32) / 255), nd.array(labels))


def train(data_dir: str, seed: int, pool: str) -> str:
    mx.random.seed(seed)
    np.random.seed(seed)
    ctx, batch_size, num_outputs, weight_scale, num_fc = mx.cpu(), 64, 10, 0.01, 128
    train_data = gluon.data.DataLoader(load(data_dir, "train"), batch_size, shuffle=True)
    test_data = gluon.data.DataLoader(load(data_dir, "test"), batch_size, shuffle=False)
    shapes = [(20, 1, 3, 3), (20,), (50, 20, 5, 5), (50,), (800, num_fc), (num_fc,), (num_fc, num_outputs),
              (num_outputs,)]
    params = [nd.random_normal(shape=s, scale=weight_scale, ctx=ctx) for s in shapes]
    for param in params:
        param.attach_grad()
    w1, b1, w2, b2, w3, b3, w4, b4 = params

    def net(x):
        h1 = nd.Pooling(data=nd.relu(nd.Convolution(data=x, weight=w1, bias=b1, kernel=(3, 3), num_filter=20)),
                        pool_type=pool, kernel=(2, 2), stride=(2, 2))
        h2 = nd.Pooling(data=nd.relu(nd.Convolution(data=h1, weight=w2, bias=b2, kernel=(5, 5), num_filter=50)),
                        pool_type=pool, kernel=(2, 2), stride=(2, 2))
        h3 = nd.relu(nd.dot(nd.flatten(h2), w3) + b3)
        return nd.dot(h3, w4) + b4

    def softmax_cross_entropy(yhat_linear, y):
        return -nd.nansum(y * nd.log_softmax(yhat_linear), axis=0, exclude=True)

    def accuracy(data_iterator):
        metric = mx.metric.Accuracy()
        for data, label in data_iterator:
            metric.update(preds=nd.argmax(net(data), axis=1), labels=label)
        return metric.get()[1]

    moving_loss = 0.0
    for i, (data, label) in enumerate(train_data):
        with autograd.record():
            loss = softmax_cross_entropy(net(data), nd.one_hot(label, num_outputs))
        loss.backward()
        for param in params:
            param[:] = param - 0.01 * param.grad
        curr_loss = nd.mean(loss).asscalar()
        moving_loss = curr_loss if i == 0 else 0.99 * moving_loss + 0.01 * curr_loss
    return (f"seed {seed}: Epoch 0. Loss: {moving_loss}, Train_acc {accuracy(train_data)}, "
            f"Test_acc {accuracy(test_data)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="folder with the four MNIST IDX files")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--pool", default="avg", choices=("avg", "max"))
    args = parser.parse_args()
    for seed in (int(s) for s in args.seeds.split(",")):
        print(train(args.data_dir, seed, args.pool), flush=True)


if __name__ == "__main__":
    main()
