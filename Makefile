# The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test migrate openapi lint bench clean

# Bootstrap the virtual environment once (and again whenever pyproject.toml changes).
# `make run` installs only what the proxy needs, plus the bundled engine when
# A1111_PROXY_BACKEND=diffusers (bring your own torch build first for a GPU: see docs/engine.md).
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

# Tests also run the engine on tiny models: torch 2.13.0 first (here a CPU build on local disk;
# a bare `torch` requirement would pull GBs of CUDA build), then the test and engine extras.
$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,engine]'
	touch $@

run: $(BIN)/.installed
	@if [ "$$A1111_PROXY_BACKEND" = diffusers ]; then $(BIN)/pip install --quiet -e '.[engine]'; fi
	$(BIN)/a1111-proxy up

test: $(BIN)/.installed-test
	$(BIN)/python -m pytest

# ruff (lint and format) and mypy --strict on the package and the worker; `.ci/run` runs it first.
lint: $(BIN)/.installed-test
	$(BIN)/ruff check a1111_proxy worker tests bench migrations
	$(BIN)/ruff format --check a1111_proxy worker tests bench migrations
	$(BIN)/mypy a1111_proxy worker

migrate: $(BIN)/.installed
	$(BIN)/a1111-proxy migrate

openapi: $(BIN)/.installed
	$(BIN)/a1111-proxy openapi > openapi/openapi.json

# The table of settings in docs/configuration.md, from a1111_proxy/settings.py (tests/unit/test_docs.py
# fails when it is stale).
.PHONY: docs
docs: $(BIN)/.installed
	$(BIN)/python -m a1111_proxy.settings_doc

bench: $(BIN)/.installed-test
	$(BIN)/python bench/load.py

# Submits per second through the whole stack (API, worker, fake A1111) with Debian's wrk.
.PHONY: bench-submit
bench-submit: $(BIN)/.installed-test
	$(BIN)/python bench/submit.py

clean:
	rm -rf $(VENV) *.egg-info
