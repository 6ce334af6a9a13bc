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

# everything: unit tests, simulated and deployed federations (real SuperLink/SuperNodes)
test: $(STAMP)
	$(BIN)/python -m pytest -q

# the unit tests only (no federation started): a few minutes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# benchmarks: figures, not tests
bench: $(STAMP)
	$(BIN)/python bench/deployed_round.py
	$(BIN)/python bench/perf.py --p1
	$(BIN)/python bench/dp_step.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache .ruff_cache
