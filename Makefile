# The two commands that start from a fresh clone (Python 3.11+):
#   make train   the main job: experiments/train.py --pool=max on the default data
#   make test    the whole test suite
# Each first sets up .venv from the pinned requirements when it is missing or stale (the
# requirements files or pyproject.toml changed since it was built: .venv/.requirements.sha256
# holds their hash). Extra arguments: make train ARGS="--epochs=2", make test PYTEST_ARGS="-x tests/test_config.py".
# PYTEST_WORKERS= runs the tests in this one process (pytest-xdist off).

PYTHON ?= python3
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=
# One test process per core (at most 4), each taking whole files so that module fixtures are built once.
PYTEST_WORKERS ?= -n auto --maxprocesses=4 --dist loadfile
REQUIREMENTS := requirements.txt requirements-tfds.txt
STAMP := $(VENV)/.requirements.sha256

.PHONY: train test venv

train: venv
	$(VENV)/bin/python experiments/train.py --pool=max $(ARGS)

test: venv
	$(VENV)/bin/python -m pytest -q $(PYTEST_WORKERS) $(PYTEST_ARGS)

venv:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: $(PYTHON) is Python " + sys.version.split()[0] + "; cnn_jax needs 3.11+: run make with PYTHON=python3.11 (or newer)")'
	@want=$$(cat $(REQUIREMENTS) pyproject.toml | $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'); \
	if [ "$$(cat $(STAMP) 2>/dev/null)" != "$$want" ]; then \
	  echo "setting up $(VENV) from $(REQUIREMENTS) (first use or changed requirements: a few minutes, a few GB)"; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) \
	  && $(VENV)/bin/python -m pip install -q -r requirements.txt -r requirements-tfds.txt \
	  && $(VENV)/bin/python -m pip install -q -e . --no-deps \
	  && echo "$$want" > $(STAMP) && echo "$(VENV) is ready"; \
	fi
