# Two commands a newcomer needs: `make test` and (with the REST service) `make run` / `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test check lint imports format typecheck clean system-deps run demo

# Tests start their own redis-server on loopback; install Debian's package where it is missing.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package) for the store tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

test: $(STAMP) system-deps
	$(PY) -m pytest

lint: $(STAMP) imports
	$(VENV)/bin/ruff check service prompts_store promptserve tests bench
	$(VENV)/bin/ruff format --check service prompts_store promptserve tests bench

# The layer contracts in pyproject.toml ([tool.importlinter]): imports only point down.
imports: $(STAMP)
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format service prompts_store promptserve tests bench
	$(VENV)/bin/ruff check --fix service prompts_store promptserve tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Runs the service with the settings from the environment (PROMPTSERVE_*; see README).
run: $(STAMP)
	$(VENV)/bin/promptserve serve

# Offline demo: builds (or reuses) the proving-ground backbone, trains three example checkpoints,
# starts the service on 127.0.0.1:8000 and prints requests that work.
demo: $(STAMP)
	$(VENV)/bin/promptserve demo
