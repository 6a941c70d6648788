# Everything bootstraps from nothing: python3, node and npm are all a machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY_STAMP   := $(VENV)/.installed-dev
RUN_STAMP  := $(VENV)/.installed-run
APE_STAMP  := $(VENV)/.installed-ape
NODE_STAMP := node_modules/.installed

# pip prints one line per package it collects and installs (no bars: they garble logs), so a
# long install shows where it is.
PIP_INSTALL := $(BIN)/pip install --progress-bar off --disable-pip-version-check

.PHONY: bootstrap quickstart test test-unit test-contracts test-integration test-console lint format artifacts demo bench ape clean

bootstrap: $(PY_STAMP) $(NODE_STAMP)

# What running the package needs (seller, buyer, keeper, MCP tools, a local chain), without the
# dev tools: the README's quickstart. pip and npm run side by side: both mostly wait on downloads.
quickstart:
	$(MAKE) -j2 $(RUN_STAMP) $(NODE_STAMP)

$(BIN)/python:
	@echo "== creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	@echo "== installing x402-escrow with the seller and MCP extras into $(VENV)"
	$(PIP_INSTALL) -e '.[seller,mcp]'
	touch $@

$(PY_STAMP): pyproject.toml | $(BIN)/python
	@echo "== installing x402-escrow with the dev tools into $(VENV) (a few minutes)"
	$(PIP_INSTALL) -e '.[dev,seller,postgres,mcp]'
	touch $@

# solc-js (the compiler) and anvil (the local chain) both come from npm, pinned exactly in
# package.json and package-lock.json. Not `npm ci`: npm 11 leaves the other platforms'
# optional anvil binaries out of the lockfile, and `npm ci` then refuses it as out of sync.
$(NODE_STAMP): package.json package-lock.json
	@echo "== installing solc-js and anvil from npm into node_modules"
	npm install --no-audit --no-fund --loglevel=http
	touch $@

# Slither runs on contracts/ through the solc-js wrapper; every finding must be triaged, with its
# reason, in slither.triage.toml (scripts/slither_check.py fails on a new or a stale one).
lint: bootstrap
	$(BIN)/ruff check escrow_py escrow_devtools tests scripts examples
	$(BIN)/ruff format --check escrow_py escrow_devtools tests scripts examples
	$(BIN)/mypy
	MYPYPATH=tests $(BIN)/mypy --explicit-package-bases tests
	$(BIN)/python scripts/slither_check.py

format: bootstrap
	$(BIN)/ruff format escrow_py escrow_devtools tests scripts examples
	$(BIN)/ruff check --fix escrow_py escrow_devtools tests scripts examples

# Recompile contracts/ into the runtime's artifacts (escrow_py/chain/artifacts/) and the tools'
# (escrow_devtools/artifacts/).
artifacts: bootstrap
	$(BIN)/x402-escrow contracts build

# Everything, the Ape deployment test included (ape's own pytest plugin stays disabled:
# the deploy test drives `ape run deploy` in a subprocess).
# Four xdist workers on two cores: much of the suite waits (on blocks, deadlines, processes starting,
# other processes' answers), and a third and fourth worker run tests in that idle time. Each worker
# has its own anvil chains on free ports. The longest tests go first (tests/durations.json,
# tests/fixtures/schedule.py) and `--maxschedchunk 1` hands each free worker the next one, so no long
# test starts last. The 25 slowest tests are listed at the end, where the time goes.
PYTEST_WORKERS ?= 4
PYTEST_XDIST   := -n $(PYTEST_WORKERS) --maxschedchunk 1
# Some sandboxes and containers set PYTHONDONTWRITEBYTECODE: then each of the hundreds of processes the
# suite starts (CLI runs, replicas, keepers, agents) compiles the package from source again, and each
# xdist worker rewrites every test module's asserts again (collection 9.9 s of CPU per worker instead of
# 4.2). The test runs write their bytecode caches (__pycache__, ignored by git) as Python does by default.
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/pytest

test: bootstrap lint ape
	$(PYTEST) -q $(PYTEST_XDIST) --durations=25

# One tier at a time (markers set in tests/conftest.py): unit needs no anvil and takes seconds.
test-unit: bootstrap
	$(PYTEST) -q -m unit

test-contracts: bootstrap
	$(PYTEST) -q $(PYTEST_XDIST) -m contracts

test-integration: bootstrap ape
	$(PYTEST) -q $(PYTEST_XDIST) -m integration

# The operator console's browser test drives Debian's chromium through Playwright (no browser
# download); chromium is installed from the distribution if missing (needs root).
test-console: bootstrap
	command -v chromium >/dev/null || apt-get install -y chromium
	$(PYTEST) -q tests/facilitator/test_console.py

# The Ape deployment tooling (eth-ape, ape-foundry, ape-solidity, ape-base), in one step. It also
# lets ape-solidity find the compiler: the solc-js wrapper, where py-solc-x keeps solc versions
# (unless a native solc 0.8.30 is already there).
ape: $(APE_STAMP)

$(APE_STAMP): $(PY_STAMP) $(NODE_STAMP)
	@echo "== installing the Ape deployment tooling into $(VENV) (several minutes)"
	$(PIP_INSTALL) -e '.[dev,seller,postgres,mcp,ape]'
	mkdir -p $(HOME)/.solcx
	if [ -L $(HOME)/.solcx/solc-v0.8.30 ] || [ ! -e $(HOME)/.solcx/solc-v0.8.30 ]; then \
		ln -sfn $(CURDIR)/scripts/solc-js.cjs $(HOME)/.solcx/solc-v0.8.30; fi
	touch $@

demo: bootstrap
	$(BIN)/x402-escrow demo

bench: bootstrap
	$(BIN)/x402-escrow bench gas --json
	$(BIN)/x402-escrow bench http --json

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis .build
