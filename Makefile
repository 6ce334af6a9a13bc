# MoMA-FL: `make demo` and `make test` each create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moma-installed
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: demo test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moma-simulate --demo --name demo

# the unit tests in three pytest workers, a test file at a time each (a module's fixtures are
# made once): about 1 minute on 2 cores (552 tests in all, 532 of them unit tests)
UNIT := $(BIN)/python -m pytest -q -n 3 --dist loadfile -m "not slow"

# everything: first what starts no simulation engine, in three pytest workers (each unit-test
# file, and each deployed federation with its real SuperLink and SuperNodes, is one group; the
# longest start first: tests/conftest.py); then the simulated federations (Ray) one at a time
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 3 --dist loadgroup --no-loadscope-reorder -m "not ray"
	$(BIN)/python -m pytest -q -m ray

# the unit tests only (no federation started)
test-fast: $(STAMP)
	$(UNIT)

# benchmarks: figures, not tests
bench: $(STAMP)
	$(BIN)/python bench/deployed_round.py
	$(BIN)/python bench/perf.py --p1
	$(BIN)/python bench/dp_step.py

# on a machine with an NVIDIA GPU and no package index: install from the wheels that
# `bash bench/gpu_check.sh prepare` downloaded into .gpu-wheels/ (where PyPI is reachable), run
# the GPU tests (pytest -m gpu) and print the GPU figures; about 6-7 min on one H100
# (docs/benchmarks.md, "GPU check"). No .venv here: the GPU machine's own python3 is used.
.PHONY: gpu-check
gpu-check:
	bash bench/gpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
