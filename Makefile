# nbdgw — see README.md.  `make demo` and `make test` work on a fresh Debian machine.
.PHONY: setup doctor test test-unit test-integration demo demo-branches bench lint clean

PY := .venv/bin/python
PYTEST_ARGS ?=

setup:
	@scripts/setup.sh

doctor:
	@/usr/bin/python3 -m gateway.doctor

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

demo: setup
	$(PY) -m gateway.demo

demo-branches: setup
	$(PY) -m gateway.demo --branches

bench: setup
	$(PY) bench/datapath

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports

clean:
	rm -rf .venv .pytest_cache build *.egg-info
