"""experiments/torch_peer.py: the PyTorch time-to-99% peer learns the digits on a small subset,
is the same network as the JAX one (tests/test_benchmark.py compares their logits), and refuses
bad flags in one line."""

import os
import subprocess
import sys

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
