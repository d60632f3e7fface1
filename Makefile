# Everything the project needs is installed from here into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all demo test lint format clean bench bench-quick interpreters

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

venv: $(STAMP)

# The demo and its tests log in with the real telnet client and move the shell
# to other interpreters: PyPy (Debian's pypy3) and pyenv's CPythons when present.
INTERPRETER_PACKAGES := telnet pypy3

interpreters:
	@missing=""; \
	for tool in $(INTERPRETER_PACKAGES); do \
		command -v $$tool >/dev/null 2>&1 || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (Debian packages) for the demo and its tests"; \
		if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
		{ $$sudo apt-get update -q >/dev/null && \
		  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $$missing >/dev/null; } || \
		echo "warning: could not install$$missing; the demo uses what it finds" >&2; \
	fi

demo: $(STAMP) interpreters
	$(BIN)/python -m takeover demo

test: $(STAMP) interpreters
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The scaling benchmark (benchmarks/scale.py): results in benchmarks/results/.
bench: $(STAMP)
	$(BIN)/python benchmarks/scale.py --sizes 1,10,100,1000,10000 --repeats 5 \
		--name scale --command "make bench"

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/scale.py --sizes 1,10,100,1000 --repeats 3 \
		--name scale-quick --command "make bench-quick"

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests examples benchmarks
	$(BIN)/ruff check --fix src tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
