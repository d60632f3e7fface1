# Everything the project needs is installed from here into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all demo demo-web test matrix lint format clean bench bench-quick interpreters twisted-interpreters bytecode browser network-tools

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,lint,twisted,matrix,aiohttp,uvicorn,websockets,ws,uvloop]'
	touch $(STAMP)

venv: $(STAMP)

# pip byte-compiles a package it installs; not an editable install. Where
# PYTHONDONTWRITEBYTECODE is set (these machines), every process would then
# compile takeover again: 20 ms of CPU per recipient started, which no real
# install pays and which the benchmarks would charge to the moves. Stale
# files are harmless (Python checks the source's timestamp).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q src/takeover examples benchmarks harness

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

# The moves to another host (docs/crosshost.md) keep the kernel silent about
# the connections with a netfilter drop (nft) and announce the service address
# that moved with a gratuitous ARP (arping): Debian's nftables, iputils-arping.
NETWORK_PACKAGES := nftables iputils-arping

network-tools:
	@if ! command -v nft >/dev/null 2>&1 || ! command -v arping >/dev/null 2>&1; then \
		echo "installing $(NETWORK_PACKAGES) (Debian packages) for the moves across hosts"; \
		if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
		{ $$sudo apt-get update -q >/dev/null && \
		  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $(NETWORK_PACKAGES) >/dev/null; } || \
		echo "warning: could not install $(NETWORK_PACKAGES); the cross-host tests skip (fail in CI)" >&2; \
	fi

# The browser tests (harness/browser.py) drive Debian's headless Chromium with
# Selenium, through Debian's chromedriver: explicit paths, so that Selenium
# Manager never downloads a browser or a driver.
BROWSER_PACKAGES := chromium chromium-driver

browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing $(BROWSER_PACKAGES) (Debian packages) for the browser tests"; \
		if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
		{ $$sudo apt-get update -q >/dev/null && \
		  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q $(BROWSER_PACKAGES) >/dev/null; } || \
		echo "warning: could not install $(BROWSER_PACKAGES); the browser tests skip (fail in CI)" >&2; \
	fi

# The Twisted manhole test moves a live session to CPython 3.13: a venv there
# with takeover and its twisted and ws extras (the recipient runs a reactor; the
# WebSocket tests move a chat there). The
# interpreter is found by scripts/find-python (pyenv's versions, python3.13 on
# PATH); PY313=/path/to/python overrides it.
FIND_PYTHON := $(PYTHON) scripts/find-python
VENV313 := .venv-3.13
STAMP313 := $(VENV313)/.installed

$(STAMP313): pyproject.toml
	@py="$(PY313)"; [ -n "$$py" ] || py="$$($(FIND_PYTHON) 3.13)"; \
	if [ -n "$$py" ]; then \
		echo "$(VENV313): $$py"; \
		rm -rf $(VENV313) && "$$py" -m venv $(VENV313) && \
		$(VENV313)/bin/pip install --quiet -e '.[twisted,ws]' && touch $(STAMP313); \
	else \
		echo "warning: the manhole's move to CPython 3.13 cannot be tested" >&2; \
	fi

twisted-interpreters: $(STAMP313)

demo: $(STAMP) interpreters
	$(BIN)/python -m takeover demo

# The WebSocket chat for the browser (examples/ws_chat.py, docs/websocket.md). The
# recipient of a move may be any interpreter with takeover[ws]: .venv-3.13 has it.
WEB_PORT ?= 8080
WEB_CONTROL ?= /tmp/takeover-ws-chat.sock

demo-web: $(STAMP) twisted-interpreters bytecode
	@echo "open http://127.0.0.1:$(WEB_PORT)/ in a browser (or two) and talk; to move the room:"
	@echo "  $(abspath $(BIN))/takeover take $(WEB_CONTROL)"
	@if [ -x $(VENV313)/bin/takeover ]; then \
		echo "or to CPython 3.13:"; \
		echo "  $(abspath $(VENV313))/bin/takeover take $(WEB_CONTROL)"; fi
	@exec $(BIN)/python examples/ws_chat.py --port $(WEB_PORT) --control $(WEB_CONTROL)

test: $(STAMP) interpreters twisted-interpreters browser network-tools bytecode
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The test suite on every other supported interpreter the machine has
# (noxfile.py): CPython 3.9 to 3.13 (pyenv's, or python3.N on PATH) and PyPy
# (Debian's pypy3), each in its own venv under .nox/. `make test` runs the
# default interpreter's. 3.10, 3.12 and PyPy leave out the tests marked slow
# unless MATRIX=full. NOX_ARGS="-s tests-3.9" picks sessions; PYTEST_ARGS go
# to pytest.
matrix: $(STAMP) interpreters twisted-interpreters browser network-tools
	MATRIX="$(MATRIX)" $(BIN)/nox $(NOX_ARGS) $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

# The benchmarks (benchmarks/README.md): reports and plots in benchmarks/results/.
RESULTS := benchmarks/results

bench: $(BENCH_STAMP) network-tools bytecode
	$(BIN)/python benchmarks/scale.py --sizes 1,10,100,1000,10000 --repeats 5 \
		--name scale --command "make bench"
	$(BIN)/python benchmarks/scale.py --sizes 1000,10000,100000 --repeats 3 --probes 8 \
		--shrink-unfit --name scale-stall --command "make bench"
	$(BIN)/python benchmarks/scale.py --sizes 1000,10000,100000 --repeats 3 --probes 8 \
		--shrink-unfit --loop uvloop --name scale-uvloop --command "make bench"
	$(BIN)/python benchmarks/load.py --duration 10 --repeats 5 \
		--name load --command "make bench"
	$(BIN)/python benchmarks/load.py --duration 10 --repeats 5 --move-every 0.7 \
		--modes steady,moving,moving_starts --name load-0.7s --command "make bench"
	$(BIN)/python benchmarks/load.py --duration 10 --repeats 5 --loop asyncio,uvloop \
		--modes steady,moving --name load-uvloop --command "make bench"
	$(BIN)/python benchmarks/sidebyside.py --repeats 5 \
		--name sidebyside --command "make bench"
	$(BIN)/python benchmarks/sidebyside.py --server streams --repeats 5 \
		--name sidebyside-streams --command "make bench"
	$(BIN)/python benchmarks/plots.py --scale $(RESULTS)/scale-stall.json \
		--overlay $(RESULTS)/scale-uvloop.json
	$(BIN)/python benchmarks/plots.py --scale $(RESULTS)/scale.json \
		--load $(RESULTS)/load.json --sidebyside $(RESULTS)/sidebyside.json \
		--sidebyside $(RESULTS)/sidebyside-streams.json
	$(BIN)/python benchmarks/crosshost.py --sizes 1,10,100,1000,5000 --repeats 5 \
		--name crosshost --command "make bench"
	$(BIN)/python benchmarks/crosshost_move.py --sizes 100,1000,5000,10000 --repeats 3 \
		--name crosshost-move --command "make bench"
	$(BIN)/python benchmarks/websocket.py --connections 1000 --clients 4 --duration 10 --repeats 3 \
		--compression deflate,deflate-full,none --name websocket --command "make bench" && \
		$(BIN)/python benchmarks/plots.py --websocket $(RESULTS)/websocket.json

bench-quick: $(BENCH_STAMP) bytecode
	$(BIN)/python benchmarks/scale.py --sizes 1,10,100,1000 --repeats 3 \
		--name scale-quick --command "make bench-quick"
	$(BIN)/python benchmarks/scale.py --sizes 1000,10000 --repeats 1 --client-procs 2 \
		--loop uvloop --name scale-uvloop-quick --command "make bench-quick"
	$(BIN)/python benchmarks/load.py --duration 2 --warmup 1 --repeats 2 --quiet-wait 1 \
		--name load-quick --command "make bench-quick"
	$(BIN)/python benchmarks/load.py --duration 2.1 --warmup 1 --repeats 1 --quiet-wait 1 \
		--move-every 0.7 --modes steady,moving,moving_starts --name load-0.7s-quick \
		--command "make bench-quick"
	$(BIN)/python benchmarks/load.py --duration 2 --warmup 1 --repeats 1 --quiet-wait 1 \
		--loop asyncio,uvloop --modes steady,moving --name load-uvloop-quick \
		--command "make bench-quick"
	$(BIN)/python benchmarks/sidebyside.py --repeats 2 --drain 0.5 --warmup 0.5 --cooldown 1 \
		--quiet-wait 1 --name sidebyside-quick --command "make bench-quick"
	$(BIN)/python benchmarks/sidebyside.py --server streams --repeats 2 --drain 0.5 \
		--warmup 0.5 --cooldown 1 --quiet-wait 1 --name sidebyside-streams-quick \
		--command "make bench-quick"
	$(BIN)/python benchmarks/plots.py --scale $(RESULTS)/scale-quick.json \
		--overlay $(RESULTS)/scale-uvloop-quick.json \
		--load $(RESULTS)/load-quick.json --sidebyside $(RESULTS)/sidebyside-quick.json \
		--sidebyside $(RESULTS)/sidebyside-streams-quick.json
	$(BIN)/python benchmarks/websocket.py --connections 200 --clients 2 --duration 3 --warmup 1 \
		--move-every 1 --repeats 1 --quiet-wait 1 --compression deflate,deflate-full,none \
		--name websocket-quick --command "make bench-quick" && \
		$(BIN)/python benchmarks/plots.py --websocket $(RESULTS)/websocket-quick.json

LINTED := src tests examples benchmarks harness noxfile.py scripts/find-python

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format $(LINTED)
	$(BIN)/ruff check --fix $(LINTED)

clean:
	rm -rf $(VENV) $(VENV313) .nox build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
