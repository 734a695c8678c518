# kd_lightning — `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# make demo's size: epochs per run and stratified training images (0 = all 54,000); FORCE=1 retrains runs done before
EPOCHS ?= 10
TRAIN_SIZE ?= 10000
FORCE ?=
# pip prints one harmless line per unused local index on some machines; keep the logs readable
PIP_FILTER := sed '/is ignored: it is neither a file nor a directory/d'

.DEFAULT_GOAL := help
.PHONY: help install data demo test test-all lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(VENV)/.installed data ## create .venv, install kd_lightning (editable, with test extra), get Fashion-MNIST

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), sys.version' || { echo "Python >= 3.10 needed"; exit 1; }
	@if [ ! -x $(PY) ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	      apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); \
	    else echo "python3 -m venv failed: install python3-venv"; exit 1; fi; }; \
	fi
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | $(PIP_FILTER)
	@touch $@

data: ## install Debian's dataset-fashion-mnist when possible (else say how)
	@if [ -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(FASHION_MNIST)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    && echo "Fashion-MNIST installed under $(FASHION_MNIST)" \
	    || echo "WARNING: could not install dataset-fashion-mnist; the demo will use scikit-learn's digits"; \
	else \
	  echo "Fashion-MNIST not found. Install Debian's package dataset-fashion-mnist (sudo apt-get install" \
	       "dataset-fashion-mnist) or pass any folder with the four idx files as --data.init_args.root."; \
	fi

demo: install ## teacher, NOKD and BLKD students on Fashion-MNIST, results table, plots (EPOCHS=10 TRAIN_SIZE=10000)
	$(PY) -m kd_lightning.demo --epochs $(EPOCHS) --train-size $(TRAIN_SIZE) $(if $(FORCE),--force)

test: install ## fast test suite (slow tests skipped)
	$(PY) -m pytest -q

test-all: install ## every test, slow ones included
	$(PY) -m pytest -q -m "slow or not slow"

lint: install ## ruff lint + format check, mypy over the package, the import layers (docs/architecture.md)
	$(PY) -m ruff check kd_lightning tests benchmarks notebooks
	$(PY) -m ruff format --check kd_lightning tests benchmarks notebooks
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

format: install ## apply ruff fixes and formatting
	$(PY) -m ruff check --fix kd_lightning tests benchmarks notebooks
	$(PY) -m ruff format kd_lightning tests benchmarks notebooks

clean: ## remove runs and caches (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache .ruff_cache
