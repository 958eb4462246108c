# FinFlow developer commands. Everything runs from a fresh clone: `make run`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install services run test lint unit integration clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	./.ci/services

run: install
	$(BIN)/finflow demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest tests/unit -q

integration: install services
	$(BIN)/python -m pytest tests/integration -q --durations=10

test: install services lint
	$(BIN)/python -m pytest tests -q --durations=10

clean:
	rm -rf var build *.egg-info
