"""experiments/torch_peer.py: the PyTorch time-to-99% peer learns the digits on a small subset,
is the same network as the JAX one (tests/test_benchmark.py compares their logits), and refuses
bad flags in one line."""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
import torch_peer  # noqa: E402


def test_peer_learns_the_digits_on_a_subset_and_reports_its_accuracy(mnist_dir):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    data = torch_peer.load_mnist(mnist_dir, train_subset=3200, test_subset=1000)
    assert [tuple(t.shape) for t in data] == [(3200, 1, 28, 28), (3200,), (1000, 1, 28, 28), (1000,)]
    assert data[0].dtype == torch.float32 and 0.0 <= float(data[0].min()) and float(data[0].max()) <= 1.0
    accuracy = torch_peer.train(seed=0, epochs=1, batch_size=64, learning_rate=0.006, data=data)
    assert accuracy > 0.85   # 50 steps of Adam: ~0.9 (chance: 0.1)


def test_script_prints_its_test_accuracy_last(mnist_dir):
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "torch_peer.py"),
                           f"--data_dir={mnist_dir}", "--train_subset=640", "--test_subset=200", "--epochs=1",
                           "--threads=1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("PyTorch ") and "1 threads" in lines[0]
    assert lines[1].startswith("Epoch 0. Loss: ") and lines[-1].startswith("Test_acc 0.")
    assert lines[-1].split()[1] in lines[1]   # the last epoch's accuracy


@pytest.mark.parametrize("args, fragment", [
    (["--epochs=0"], "--epochs=0 is not allowed: it must be positive"),
    (["--learning_rate=-1"], "--learning_rate=-1.0 is not allowed: it must be positive"),
    (["--data_dir=/nowhere"], "--data_dir=/nowhere is not a folder"),
    (["--epochs=two"], "flag --epochs=two"),
    (["extra"], "unexpected arguments extra"),
])
def test_bad_flags_are_one_line(args, fragment):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "torch_peer.py"), *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


def _copy_family_params(net, config, params, model_state):
    """Load cnn_jax's params and batch-norm statistics of a vgg / resnet config into `net`
    (make_vgg / make_resnet): convs (kh, kw, in, out) -> (out, in, kh, kw), the output layer's
    input rows from JAX's (H, W, C) flattening to torch's (C, H, W)."""
    import jax
    import torch

    from cnn_jax import model

    flat_names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if config.model == "vgg":
        conv_params = [params[f"conv{b}_{j}"]["w"] for b in range(1, len(config.widths) + 1)
                       for j in range(1, config.depth + 1)]
        bn_names = [f"bn{b}_{j}" for b in range(1, len(config.widths) + 1) for j in range(1, config.depth + 1)]
        bn_pairs = [(params[n], model_state[n]) for n in bn_names]
    else:
        blocks = [n for n in params if n.startswith("stage")]
        conv_params = [params["stem"]["w"]]
        bn_pairs = []
        for n in blocks:
            conv_params += [params[n]["conv1"]["w"], params[n]["conv2"]["w"]]
            conv_params += [params[n]["proj"]["w"][None, None]] if "proj" in params[n] else []
            bn_pairs += [(params[n]["bn1"], model_state[n]["bn1"]), (params[n]["bn2"], model_state[n]["bn2"])]
        bn_pairs.append((params["final_bn"], model_state["final_bn"]))
    assert len(convs) == len(conv_params) and len(norms) == len(bn_pairs), flat_names
    t = lambda a: torch.from_numpy(np.array(a, np.float32))   # noqa: E731
    with torch.no_grad():
        for m, w in zip(convs, conv_params):
            m.weight.copy_(t(np.asarray(w).transpose(3, 2, 0, 1)))
        for m, (p, s) in zip(norms, bn_pairs):
            m.weight.copy_(t(p["scale"])), m.bias.copy_(t(p["bias"]))
            m.running_mean.copy_(t(s["mean"])), m.running_var.copy_(t(s["var"]))
        out = np.asarray(params["output"]["w"])
        if config.model == "vgg":
            h, w_, c = dict(model.layer_shapes(config))[f"pool{len(config.widths)}"]
            out = out.reshape(h, w_, c, -1).transpose(2, 0, 1, 3).reshape(h * w_ * c, -1)
        linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        linear.weight.copy_(t(out.T)), linear.bias.copy_(t(params["output"]["b"]))


@pytest.mark.parametrize("family, input_shape", [("vgg", (28, 28, 1)), ("resnet", (28, 28, 1)),
                                                  ("resnet", (32, 32, 3))])
def test_the_family_networks_compute_the_jax_families(family, input_shape):
    """make_vgg / make_resnet with cnn_jax's params and running averages give cnn_jax's evaluation
    logits: the same layers, padding (XLA's SAME, odd pixel low or high), shortcuts and flattening."""
    torch = pytest.importorskip("torch")
    import jax

    from cnn_jax import config as config_lib
    from cnn_jax import model

    config = model.validate(config_lib.replace(config_lib.PRESETS[family], widths=(4, 8, 8), depth=2,
                                                    input_shape=input_shape))
    params, model_state = model.init(jax.random.key(3), config)
    rng = np.random.default_rng(0)
    model_state = jax.tree.map(lambda v: v + rng.uniform(0.1, 0.5, v.shape).astype(np.float32), model_state)
    make = torch_peer.make_vgg if family == "vgg" else torch_peer.make_resnet
    net = make(config.widths, config.depth, config.dropout, config.bn_momentum, config.num_classes, input_shape).eval()
    _copy_family_params(net, config, params, model_state)
    images = rng.random((3, *input_shape), np.float32)
    expected = np.asarray(model.apply(params, model_state, images, config)[0])
    got = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
