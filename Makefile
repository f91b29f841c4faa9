# nodemesh — the two commands of the README are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test unit e2e lint bench proto clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/nodemesh lab demo

test: setup lint
	@$(PY) -m pytest -q tests/unit tests/integration tests/e2e

unit: setup
	@$(PY) -m pytest -q tests/unit

e2e: setup
	@$(PY) -m pytest -q tests/e2e

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports

bench: setup
	@$(PY) -m pytest -q -s tests/bench

proto: setup
	@$(PY) -m api.generate

clean:
	-@$(VENV)/bin/nodemesh lab down 2>/dev/null || true
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
