# The two commands the README starts with: `make quickstart` and `make test`.
.PHONY: setup quickstart test test-fast lint world bench
VENV := .venv
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export OMP_WAIT_POLICY ?= PASSIVE

setup:
	@bash scripts/setup.sh

quickstart: setup
	$(BIN)/mopd world build configs/quickstart.yaml
	$(BIN)/mopd train configs/quickstart.yaml

test: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The developers' fast lane: pure and in-process tests (no engines, no Ray cluster), about 2 minutes.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
