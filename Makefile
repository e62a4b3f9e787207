# Two commands a newcomer needs: `make test` and (with the REST service) `make run` / `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test check lint imports format typecheck clean system-deps run demo

# Tests start their own redis-server on loopback, and drive the web console in Debian's chromium
# (Playwright from PyPI with executable_path: its own browser download is not used). Install the
# Debian packages that are missing.
SYSTEM_PACKAGES := redis-server:redis-server chromium:chromium
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the tests:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; fi

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
