# The two commands a newcomer runs: `make demo` and `make test`.
# Each creates .venv, installs sdproxy into it, and fetches Consul (cached) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint consul clean loadtest

demo: $(VENV)/.installed consul
	$(PY) -m proxy demo

test: $(VENV)/.installed consul
	$(PY) -m pytest -q -p no:cacheprovider

consul: $(VENV)/.installed
	$(PY) -m proxy.devconsul install

lint: $(VENV)/.dev
	$(PY) -m ruff check proxy tests loadtest bench
	$(PY) -m mypy proxy

# Tools for working on sdproxy: ruff, mypy, and py-spy and valgrind for profiling.
$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info

# Load tests (benchmarks, never part of `make test`): `make loadtest SCENARIO=failover`.
SCENARIO ?= throughput
loadtest: $(VENV)/.loadtest
	$(PY) -m loadtest $(SCENARIO) $(ARGS)

$(VENV)/.loadtest: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,loadtest]'
	touch $@
