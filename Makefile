# The two commands a newcomer runs: `make demo` and `make test`.
# Each creates .venv, installs sdproxy into it, and fetches Consul (cached) before running.
# The install compiles the hot modules with mypyc when a C compiler is present (setup.py);
# `.venv/bin/sdproxy --version` says whether they run compiled or as pure Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-pure build lint consul clean loadtest

demo: build consul
	$(PY) -m proxy demo

test: build consul
	$(PY) -m pytest -q -p no:cacheprovider

# The unit suite with every module run from its .py file (CI runs it after `make test`,
# so code that behaves differently compiled cannot land).
test-pure: $(VENV)/.installed
	SDPROXY_PURE_PYTHON=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit

# Recompile the hot modules when one of their sources changed since the build. Without
# this a changed module is not run stale either: proxy/compiled.py then runs the whole
# package as pure Python, with a warning; this keeps `make test` testing compiled code.
build: $(VENV)/.installed
	@$(PY) -c 'import proxy; raise SystemExit(bool(proxy.BUILD.stale))' 2>/dev/null \
		|| { echo "recompiling: sources changed since the build"; \
		     $(PY) -m pip install -q --no-deps -e .; }

consul: $(VENV)/.installed
	$(PY) -m proxy.devconsul install

lint: $(VENV)/.dev
	$(PY) -m ruff check proxy tests loadtest bench
	$(PY) -m mypy proxy

# Tools for working on sdproxy: ruff, mypy, and py-spy and valgrind for profiling.
$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $@

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info *__mypyc.*.so proxy/_compiled.sha256
	find proxy -name '*.so' -delete

# Load tests (benchmarks, never part of `make test`): `make loadtest SCENARIO=failover`.
SCENARIO ?= throughput
loadtest: $(VENV)/.loadtest
	$(PY) -m loadtest $(SCENARIO) $(ARGS)

$(VENV)/.loadtest: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,loadtest]'
	touch $@
