# One-command set-up on a fresh machine: a virtual environment with the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup test test-numerics demo serve bench chromium

$(BIN)/spdinv: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,demo]"
	touch $@

# The demo's browser tests drive Debian's chromium (Playwright's own browser download needs the
# network at test time): installed when missing, as root or through sudo; otherwise a warning, and
# those tests skip saying so.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
		elif sudo -n true 2>/dev/null; then sudo apt-get update -q && sudo apt-get install -y -q chromium; \
		else echo "warning: chromium is missing and cannot be installed without root: apt-get install -y chromium" \
			"(the demo's browser tests skip)" >&2; fi

setup: $(BIN)/spdinv chromium

test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/pytest

# The tests whose numbers depend on how torch splits work across threads (inversions, sampling,
# edits compared across batch layouts): CI runs them again at one thread, as HPC shells and CI
# runners set OMP_NUM_THREADS=1 (`make test-numerics THREADS=1`).
NUMERICS_TESTS := tests/test_inversion.py tests/test_peers.py tests/test_models.py tests/test_sampling.py \
	tests/test_editing.py tests/test_sdxl.py tests/test_library_input.py tests/test_costs.py tests/test_fidelity.py \
	tests/test_flow.py tests/test_flow_peers.py tests/test_flow_editing.py
THREADS ?= 1
test-numerics: $(BIN)/spdinv
	OMP_NUM_THREADS=$(THREADS) $(BIN)/pytest -q $(NUMERICS_TESTS)

demo: $(BIN)/spdinv  # the main job needs no browser
	$(BIN)/spdinv edit examples/red-circle.png --source "a large red circle in the centre on a white background" \
		--target "a large blue circle in the centre on a white background" --blend "circle circle" --out spdinv-out/demo

serve: $(BIN)/spdinv
	$(BIN)/spdinv demo
