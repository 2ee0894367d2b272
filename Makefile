# The two commands that start from a fresh clone (Python 3.11+):
#   make train   the main job: experiments/train.py --pool=max on the default data
#   make test    the whole test suite
# Each first sets up .venv from the pinned requirements.txt when it is missing or stale (it or
# pyproject.toml changed since it was built: .venv/.requirements.sha256 holds their hash). make test
# (and make tfds) also installs requirements-tfds.txt, TensorFlow, which only preparing a TFDS download
# needs (the tests prepare one); .venv/.requirements-tfds.sha256 holds that file's hash. Extra
# arguments: make train ARGS="--epochs=2", make test PYTEST_ARGS="-x tests/test_config.py".
# PYTEST_WORKERS= runs the tests in this one process (pytest-xdist off).

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=
# One test process per core (at most 4), each taking whole files so that module fixtures are built once.
PYTEST_WORKERS ?= -n auto --maxprocesses=4 --dist loadfile
HASH = $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
STAMP := $(VENV)/.requirements.sha256
TFDS_STAMP := $(VENV)/.requirements-tfds.sha256

.PHONY: train test venv tfds

train: venv
	$(VENV)/bin/python experiments/train.py --pool=max $(ARGS)

test: tfds
	$(VENV)/bin/python -m pytest -q $(PYTEST_WORKERS) $(PYTEST_ARGS)

venv:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: $(PYTHON) is Python " + sys.version.split()[0] + "; cnn_jax needs 3.11+: run make with PYTHON=python3.11 (or newer)")'
	@want=$$(cat requirements.txt pyproject.toml | $(HASH)); \
	if [ "$$(cat $(STAMP) 2>/dev/null)" != "$$want" ]; then \
	  echo "setting up $(VENV) from requirements.txt (first use or changed requirements: a few minutes)"; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) \
	  && $(VENV)/bin/python -m pip install -q -r requirements.txt \
	  && $(VENV)/bin/python -m pip install -q -e . --no-deps \
	  && echo "$$want" > $(STAMP) && echo "$(VENV) is ready"; \
	fi

# TensorFlow, for TensorFlow Datasets to prepare a download; the main job reads the official files without it.
tfds: venv
	@want=$$(cat requirements-tfds.txt | $(HASH)); \
	if [ "$$(cat $(TFDS_STAMP) 2>/dev/null)" != "$$want" ]; then \
	  echo "installing requirements-tfds.txt into $(VENV): TensorFlow (~1.45 GB, ~1 min), which TensorFlow Datasets needs to prepare a download (the tests prepare one)"; \
	  $(VENV)/bin/python -m pip install -q -r requirements.txt -r requirements-tfds.txt \
	  && echo "$$want" > $(TFDS_STAMP) && echo "$(VENV) has TensorFlow"; \
	fi
