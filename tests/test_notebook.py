"""notebooks/quickstart.ipynb runs top to bottom in a real Jupyter kernel (on a small real subset)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO_ROOT

NOTEBOOK = os.path.join(REPO_ROOT, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_runs_every_cell(mnist_dir, monkeypatch):
    for name, value in {"CNN_JAX_MNIST_DIR": os.path.abspath(mnist_dir), "QUICKSTART_TRAIN_SUBSET": "1000",
                        "QUICKSTART_TEST_SUBSET": "1000", "QUICKSTART_EPOCHS": "1"}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Any failing cell raises CellExecutionError here.
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    assert "conv1" in text and "flatten  800" in text            # the debug shape trace
    assert "Epoch 0. Loss:" in text and "test accuracy" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 3                                       # curves, filters, confusion matrix
