# The two commands the README starts with: `make quickstart` and `make test`.
.PHONY: setup quickstart test lint world bench
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
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
