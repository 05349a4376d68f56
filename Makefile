# Two entry points do all the setup: `make demo` and `make test`.
# Both create .venv and install cmdlog into it on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UNICODE_DATA := /usr/share/unicode/DerivedNormalizationProps.txt

.PHONY: demo test test-quick lint unicode-data bench bench-quick bench-deps

$(BIN)/cmdlog: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/cmdlog

# The username tests compare against Unicode's own data files.
unicode-data:
	@test -f $(UNICODE_DATA) || (apt-get update -qq && apt-get install -y -qq unicode-data)

demo: $(BIN)/cmdlog
	$(BIN)/cmdlog demo

# The quick suite, then the thorough one (tests marked slow).
test: $(BIN)/cmdlog unicode-data
	$(BIN)/pytest -q
	$(BIN)/pytest -q -m slow

test-quick: $(BIN)/cmdlog unicode-data
	$(BIN)/pytest -q

lint: $(BIN)/cmdlog
	$(BIN)/ruff format --check cmdlog tests $(wildcard bench)
	$(BIN)/ruff check cmdlog tests $(wildcard bench)
	$(BIN)/mypy

# The benchmark suite (bench/run.py); it starts and stops every server itself.
bench-deps: $(BIN)/cmdlog
	$(BIN)/pip install --quiet -e '.[test,bench]'

bench-quick: bench-deps
	$(BIN)/python -m bench.run --quick

bench: bench-deps
	$(BIN)/python -m bench.run
