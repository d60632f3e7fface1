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

# The benchmarks' plots need matplotlib (the bench extra); make test does not.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

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

# The benchmarks (benchmarks/README.md): reports and plots in benchmarks/results/.
RESULTS := benchmarks/results

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/scale.py --sizes 1,10,100,1000,10000 --repeats 5 \
		--name scale --command "make bench"
	$(BIN)/python benchmarks/load.py --duration 10 --repeats 5 \
		--name load --command "make bench"
	$(BIN)/python benchmarks/sidebyside.py --repeats 5 \
		--name sidebyside --command "make bench"
	$(BIN)/python benchmarks/plots.py --scale $(RESULTS)/scale.json \
		--load $(RESULTS)/load.json --sidebyside $(RESULTS)/sidebyside.json

bench-quick: $(BENCH_STAMP)
	$(BIN)/python benchmarks/scale.py --sizes 1,10,100,1000 --repeats 3 \
		--name scale-quick --command "make bench-quick"
	$(BIN)/python benchmarks/load.py --duration 2 --warmup 1 --repeats 2 \
		--name load-quick --command "make bench-quick"
	$(BIN)/python benchmarks/sidebyside.py --repeats 2 --drain 0.5 --warmup 0.5 --cooldown 1 \
		--name sidebyside-quick --command "make bench-quick"
	$(BIN)/python benchmarks/plots.py --scale $(RESULTS)/scale-quick.json \
		--load $(RESULTS)/load-quick.json --sidebyside $(RESULTS)/sidebyside-quick.json

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests examples benchmarks
	$(BIN)/ruff check --fix src tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
