# One-command set-up on a fresh machine: a virtual environment with the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup test demo bench

$(BIN)/spdinv: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/spdinv

test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/pytest

demo: setup
	$(BIN)/spdinv edit examples/red-circle.png --source "a large red circle in the centre on a white background" \
		--target "a large blue circle in the centre on a white background" --blend "circle circle" --out spdinv-out/demo
