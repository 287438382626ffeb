# The two commands a new user needs:
#   make serve   the server on the shipped default model, http://127.0.0.1:8000
#   make test    install everything (Debian packages as root, Python packages in .venv) and run the tests
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
MODEL_DIR ?= exported/fmnist-resnet18-eed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

# The shipped default model: EED ResNet-18 (width 0.25) on Fashion-MNIST, trained on a CPU with the
# CLI's defaults (EED, KL with the authors' weight α = 0.1, β = 1, T = 3).
DEFAULT_RUN ?= runs/default-fmnist-resnet18-w025
DEFAULT_TRAIN_ARGS ?= --arch resnet18 --dataset fashion-mnist --width-mult 0.25 --epochs 15 --val-split 5000 --seed 0

.PHONY: test test-all lint serve system-deps install install-serve default-model clean lock container-test

$(VENV)/.installed: pyproject.toml
	@bash scripts/ensure_venv.sh $(PYTHON)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[train,serve,dev]'
	touch $@

$(SERVE_VENV)/.installed: pyproject.toml
	@bash scripts/ensure_venv.sh $(PYTHON)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q -e '.[serve]'
	touch $@

install: $(VENV)/.installed
install-serve: $(SERVE_VENV)/.installed

system-deps:
	@bash scripts/install_system_deps.sh

# ruff (format check and lint, pyproject.toml [tool.ruff]) on the whole tree, mypy on serving/
# and training/ ([tool.mypy]: every function body checked, unannotated functions allowed).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: system-deps $(VENV)/.installed lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Slow tests too (not GPU ones).
test-all: system-deps $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m "not gpu" $(PYTEST_ARGS)

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m serving --model-dir $(MODEL_DIR) --host $(HOST) --port $(PORT)

# Reproduce the shipped default model end to end: train (resumable), evaluate, export.
default-model: system-deps $(VENV)/.installed
	@if [ -f $(DEFAULT_RUN)/checkpoint.pt ]; then \
	  $(VENV)/bin/python training/train.py --resume $(DEFAULT_RUN); \
	else \
	  $(VENV)/bin/python training/train.py $(DEFAULT_TRAIN_ARGS) --output-dir $(dir $(DEFAULT_RUN)) --run-name $(notdir $(DEFAULT_RUN)); \
	fi
	$(VENV)/bin/python -m training.evaluate $(DEFAULT_RUN)/checkpoint.pt --split test --out $(DEFAULT_RUN)/eval
	$(VENV)/bin/python -m training.export $(DEFAULT_RUN)/checkpoint.pt --out $(MODEL_DIR) --name $(notdir $(MODEL_DIR)) --samples 12 --force

# Hashed lock files the images install with --require-hashes (Linux x86_64 wheels): the serve
# and train extras for the images' Python 3.11, and the serve extra with onnxruntime-gpu for the
# GPU image's Python 3.10 (Ubuntu 22.04). Re-run after changing dependencies in pyproject.toml;
# tests/test_locks.py fails while a lock no longer satisfies it.
UV_COMPILE = $(VENV)/bin/uv pip compile --generate-hashes --python-platform x86_64-manylinux_2_28 --quiet
lock: $(VENV)/.installed
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra serve --python-version 3.11 -o requirements/serve.lock
	$(UV_COMPILE) pyproject.toml requirements/build.in --extra train --python-version 3.11 -o requirements/train.lock
	$(UV_COMPILE) pyproject.toml requirements/build.in requirements/gpu.in --extra serve --no-emit-package onnxruntime --python-version 3.10 -o requirements/serve-gpu.lock

# The README's `docker compose up` for real: the CPU image built and run with rootful podman,
# docker-compose against podman's Docker API, Prometheus scraping the server (root; a few minutes;
# scripts/container_test.sh says how).
container-test: $(VENV)/.installed
	bash scripts/container_test.sh

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache
