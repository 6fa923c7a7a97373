# Two commands do all the set-up: `make quickstart` (the main job) and `make test` (the suite).
# Each builds or updates .venv from pyproject.toml first, when .venv is missing or older than it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -q -n 2 --dist loadscope --no-loadscope-reorder
QUICKSTART_ARGS ?=

.PHONY: quickstart test venv venv-test clean-venv

quickstart: $(VENV)/.installed-run
	$(BIN)/easytunix quickstart $(QUICKSTART_ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

venv: $(VENV)/.installed-run
venv-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The library and its runtime dependencies (what the quickstart needs).
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

# Plus the tests' reference numerics (torch CPU, transformers, gguf) and the optional vLLM engine,
# which the tests cover; setup-vllm keeps the versions pyproject.toml pins for the tests.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-run
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/easytunix setup-vllm
	touch $@

clean-venv:
	rm -rf $(VENV)
