# leanserve: the two commands a newcomer needs are `make demo` and `make test`.
# Everything else here is for developers.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
EXTRAS  = operator,serving,dev
# Pinned versions (pip freeze of a known-good environment): CI and laptops resolve the same packages.
CONSTRAINTS = requirements/constraints.txt

.PHONY: help demo test unit lint fmt crds crds-check clean

help:
	@echo "make demo   run the main job locally on the shipped examples (no cluster needed)"
	@echo "make test   create $(VENV), install everything, run lint and the whole test suite"
	@echo "make crds   regenerate crds/ from the pydantic models"
	@echo "make lint   ruff check + format check;  make fmt: apply ruff format and fixes"

# The virtualenv is rebuilt when the project's metadata or the pins change.
$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	@touch $@

demo: $(BIN)/.installed
	$(BIN)/leanserve demo --examples examples

test: $(BIN)/.installed lint crds-check
	$(BIN)/python -m pytest

unit: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not cluster"

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

crds: $(BIN)/.installed
	$(BIN)/leanserve crds --out crds

crds-check: $(BIN)/.installed
	$(BIN)/leanserve crds --out crds --check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info
