# The two commands of the README: `make demo` and `make test`. Each runs its own set-up first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow lint bench study clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/recallk train --config configs/kanji.yaml --name demo --overwrite

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --timeout=600

test-slow: setup
	$(PY) -m pytest -q -p no:cacheprovider -m slow --timeout=1800

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench.py loss
	$(PY) benchmarks/bench.py engine
	$(PY) benchmarks/bench.py eval

study: setup
	$(PY) benchmarks/study.py

clean:
	rm -rf runs build dist .pytest_cache
