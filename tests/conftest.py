"""Shared fixtures: the real MNIST files and a small real subset loaded once."""

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_DIR = os.environ.get("CNN_JAX_MNIST_DIR", os.path.join(REPO_ROOT, "..", "shared", "data", "mnist"))


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    if not os.path.exists(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.fail(f"real MNIST IDX files not found in {MNIST_DIR}; set CNN_JAX_MNIST_DIR")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from cnn_jax import data
    return data.load_idx_dir(mnist_dir, "mnist")
