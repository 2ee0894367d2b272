"""The tutorial's CNN trained in PyTorch with PyTorch's own CPU recipe: the benchmark's time-to-99% peer.

    python experiments/torch_peer.py --data_dir=../shared/data/mnist --seed=0

The network is `--preset=fast`'s (conv 3x3x20 -> relu -> 2x2 max pool -> conv 5x5x50 -> relu ->
2x2 max pool -> dense 128 -> relu -> dense 10) in PyTorch's own layout (NCHW) and default init;
the recipe is PyTorch's best practice on a CPU: the whole data set in memory as tensors, batches
gathered by index, one intra-op thread per core (OpenMP threads that sleep rather than spin
while waiting), Adam with `OneCycleLR`, evaluation under `torch.inference_mode`. The flags'
defaults are the recipe that reaches test accuracy >= 0.99 on every seed (docs/performance.md). `experiments/benchmark.py` runs this script in a
subprocess, timed from process start to exit; its last line is `Test_acc <accuracy>`.

`make_vgg` and `make_resnet` are cnn_jax's `vgg` and `resnet` families in PyTorch, for the
benchmark's family rows (square inputs, as every dataset here has).

It imports neither JAX nor cnn_jax's command-line module (which imports JAX), so its process
time is PyTorch's own; bad flags and missing data still end in one line and exit status 2.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

from cnn_jax.data import registry as datasets
from cnn_jax.data.files import DataError, read_idx_folder

FLAGS = flags.FLAGS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_BATCH = 1000


def make_net(pool: str = "max", conv_filters: tuple[int, ...] = (20, 50), conv_kernels: tuple[int, ...] = (3, 5),
             pool_window: int = 2, pool_stride: int = 2, num_fc: int = 128, num_classes: int = 10,
             input_shape: tuple[int, int, int] = (28, 28, 1), conv_stride: int = 1):
    """The tutorial's CNN as a `torch.nn.Sequential` (NCHW input), PyTorch's default init.

    The flattened width comes from a forward pass of a zero image, not from a second shape formula."""
    import torch
    from torch import nn

    pool_layer = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]
    features, channels = [], input_shape[2]
    for filters, kernel in zip(conv_filters, conv_kernels):
        features += [nn.Conv2d(channels, filters, kernel, conv_stride), nn.ReLU(), pool_layer(pool_window, pool_stride)]
        channels = filters
    features.append(nn.Flatten())
    with torch.no_grad():
        flat = nn.Sequential(*features)(torch.zeros(1, input_shape[2], *input_shape[:2])).shape[1]
    return nn.Sequential(*features, nn.Linear(flat, num_fc), nn.ReLU(), nn.Linear(num_fc, num_classes))


def _conv3x3(cin: int, cout: int, size: int, stride: int = 1):
    """A bias-free 3x3 convolution with XLA's SAME padding for a `size` x `size` input (the high
    side gets the odd pixel)."""
    from torch import nn

    from cnn_jax.nn.layers import same_padding

    low, high = same_padding(size, 3, stride)
    conv = nn.Conv2d(cin, cout, 3, stride, padding=low if low == high else 0, bias=False)
    return conv if low == high else nn.Sequential(nn.ZeroPad2d((low, high, low, high)), conv)


def make_vgg(widths: tuple[int, ...], depth: int, dropout: float, bn_momentum: float,
             num_classes: int = 10, input_shape: tuple[int, int, int] = (28, 28, 1)):
    """cnn_jax's `vgg` family in PyTorch (NCHW): per block `depth` x (3x3 conv -> batch norm ->
    relu), then 2x2 max pooling; dropout and the output layer. PyTorch's default init."""
    import torch
    from torch import nn

    from cnn_jax.nn.layers import BN_EPSILON

    layers, channels, size = [], input_shape[2], input_shape[0]
    for width in widths:
        for _ in range(depth):
            layers += [_conv3x3(channels, width, size), nn.BatchNorm2d(width, BN_EPSILON, 1.0 - bn_momentum), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2, 2))
        size //= 2
    features = nn.Sequential(*layers, nn.Flatten())
    with torch.no_grad():
        flat = features.eval()(torch.zeros(1, input_shape[2], *input_shape[:2])).shape[1]
    return nn.Sequential(*features.train(), nn.Dropout(dropout), nn.Linear(flat, num_classes))


def _pre_act_block_class():
    import torch
    from torch import nn

    from cnn_jax.nn.layers import BN_EPSILON

    class PreActBlock(nn.Module):
        """relu(bn1(x)) -> conv1 (stride) -> relu(bn2) -> conv2, plus the shortcut: x, or the
        1x1 projection of relu(bn1(x)) where the shape changes (cnn_jax's resnet block)."""

        def __init__(self, cin: int, cout: int, size: int, stride: int, bn_momentum: float):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin, BN_EPSILON, 1.0 - bn_momentum)
            self.conv1 = _conv3x3(cin, cout, size, stride)
            self.bn2 = nn.BatchNorm2d(cout, BN_EPSILON, 1.0 - bn_momentum)
            self.conv2 = _conv3x3(cout, cout, -(-size // stride))
            self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.bn1(x))
            y = self.conv2(torch.relu(self.bn2(self.conv1(h))))
            return y + (self.proj(h) if self.proj is not None else x)

    return PreActBlock


def make_resnet(widths: tuple[int, ...], depth: int, dropout: float, bn_momentum: float,
                num_classes: int = 10, input_shape: tuple[int, int, int] = (28, 28, 1)):
    """cnn_jax's `resnet` family in PyTorch (NCHW): a 3x3 stem, stages of pre-activation blocks
    (the first block of every stage but the first at stride 2), batch norm, relu, global average
    pooling, dropout and the output layer. PyTorch's default init."""
    from torch import nn

    from cnn_jax.nn.layers import BN_EPSILON

    block = _pre_act_block_class()
    size, channels = input_shape[0], widths[0]
    layers = [_conv3x3(input_shape[2], channels, size)]
    for s, width in enumerate(widths):
        for b in range(depth):
            stride = 2 if s > 0 and b == 0 else 1
            layers.append(block(channels, width, size, stride, bn_momentum))
            channels, size = width, -(-size // stride)
    return nn.Sequential(*layers, nn.BatchNorm2d(channels, BN_EPSILON, 1.0 - bn_momentum), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))


def load_mnist(data_dir: str, train_subset: int = 0, test_subset: int = 0):
    """(train images NCHW float32 in [0, 1], train labels int64, test images, test labels) as tensors,
    normalised as cnn_jax normalises MNIST."""
    import torch

    arrays = read_idx_folder(data_dir)
    normalize = datasets.get("mnist").normalize
    out = []
    for split, subset in (("train", train_subset), ("test", test_subset)):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if subset:
            images, labels = images[:subset], labels[:subset]
        nchw = np.ascontiguousarray(normalize(images).transpose(0, 3, 1, 2))
        out += [torch.from_numpy(nchw), torch.from_numpy(labels.astype(np.int64))]
    return tuple(out)


def accuracy(net, images, labels) -> float:
    import torch

    net.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), EVAL_BATCH):
            logits = net(images[start:start + EVAL_BATCH])
            correct += int((logits.argmax(1) == labels[start:start + EVAL_BATCH]).sum())
    net.train()
    return correct / len(labels)


def train(seed: int, epochs: int, batch_size: int, learning_rate: float, data, use_compile: bool = False):
    """Train `make_net()` on `data` (load_mnist's tuple); print one line per epoch; return the test accuracy."""
    import torch
    import torch.nn.functional as F

    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    net = make_net()
    steps_per_epoch = len(train_y) // batch_size
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate,
                                                   total_steps=epochs * steps_per_epoch)

    def step(x, y):
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    step_fn = torch.compile(step) if use_compile else step
    order_rng = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(train_y), generator=order_rng)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = step_fn(train_x[idx], train_y[idx])
            schedule.step()
        seconds = time.perf_counter() - start
        test_acc = accuracy(net, test_x, test_y)
        print(f"Epoch {epoch}. Loss: {loss.item():.5f}, Test_acc {test_acc:.4f}, {seconds:.1f} s, "
              f"{steps_per_epoch * batch_size / seconds:.0f} img/s", flush=True)
    return test_acc


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {' '.join(argv[1:])}; flags look like --name=value")
    for name in ("epochs", "batch_size"):
        if FLAGS[name].value < 1:
            raise ValueError(f"--{name}={FLAGS[name].value} is not allowed: it must be positive")
    if not FLAGS.learning_rate > 0:
        raise ValueError(f"--learning_rate={FLAGS.learning_rate} is not allowed: it must be positive")
    data_dir = FLAGS.data_dir or os.path.join(REPO_ROOT, "..", "shared", "data", "mnist")
    if not os.path.isdir(data_dir):
        raise ValueError(f"--data_dir={data_dir} is not a folder; point it at the MNIST IDX files")
    # OpenMP threads that sleep when idle instead of spinning: on a CPU shared with other work a
    # spinning thread holds a core another thread needs (measured on a busy 2-core machine;
    # CHANGELOG.md). A value already in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    threads = FLAGS.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    data = load_mnist(data_dir, FLAGS.train_subset, FLAGS.test_subset)
    if FLAGS.batch_size > len(data[1]):
        raise ValueError(f"--batch_size={FLAGS.batch_size} is larger than the {len(data[1])} training images")
    print(f"PyTorch {torch.__version__}, {threads} threads, compile={FLAGS.compile}", flush=True)
    test_acc = train(FLAGS.seed, FLAGS.epochs, FLAGS.batch_size, FLAGS.learning_rate, data, FLAGS.compile)
    print(f"Test_acc {test_acc:.4f}", flush=True)


def define_flags() -> None:
    """The script's flags; defined only when it runs as a script, so the benchmark can import
    `make_net` beside its own flags of the same names."""
    flags.DEFINE_string("data_dir", "", "MNIST IDX folder; empty: ../shared/data/mnist beside the repository.")
    flags.DEFINE_integer("seed", 0, "Seed of the init and the batch order.")
    flags.DEFINE_integer("epochs", 2, "Passes over the training set.")
    flags.DEFINE_integer("batch_size", 64, "Training batch size.")
    flags.DEFINE_float("learning_rate", 0.006, "Peak learning rate of the one-cycle schedule.")
    flags.DEFINE_integer("threads", 0, "Intra-op threads (0: one per core this process may use).")
    flags.DEFINE_boolean("compile", False, "Train through torch.compile (inductor).")
    flags.DEFINE_integer("train_subset", 0, "Train on the first N images only (0: all).")
    flags.DEFINE_integer("test_subset", 0, "Evaluate on the first N test images only (0: all).")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parser, but an unparsable flag is one line on stderr and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}; run with --helpshort to list the flags", file=sys.stderr)
        sys.exit(2)


def guarded(argv: list[str]) -> None:
    """`main`, with bad flags and unreadable data as one line on stderr and exit status 2."""
    try:
        main(argv)
    except (ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(guarded, flags_parser=parse_flags)
