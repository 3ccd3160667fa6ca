# wrenn-engine: the two commands a newcomer needs are `make demo` and `make test`.
# Both create .venv when it is missing, install the project into it and the
# system packages the host steps use (as root, with apt-get), then run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: test demo bench lint typecheck system-deps clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $@

system-deps:
	@sh scripts/system-deps.sh

test: system-deps $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: system-deps $(STAMP)
	$(BIN)/wrenn-engine demo

bench: system-deps $(STAMP)
	$(BIN)/python -m wrenn_engine.bench $(if $(QUICK),--quick) $(if $(JSON),--json $(JSON))

lint: $(STAMP)
	$(BIN)/ruff check wrenn_engine tests migrations

typecheck: $(STAMP)
	$(BIN)/mypy wrenn_engine

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
