# Everything bootstraps from nothing: python3, node and npm are all a machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY_STAMP   := $(VENV)/.installed-dev
APE_STAMP  := $(VENV)/.installed-ape
NODE_STAMP := node_modules/.installed

.PHONY: bootstrap test test-unit test-contracts test-integration lint format artifacts demo bench ape clean

bootstrap: $(PY_STAMP) $(NODE_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(PY_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,seller]'
	touch $@

# solc-js (the compiler) and anvil (the local chain) both come from npm, pinned exactly in
# package.json and package-lock.json. Not `npm ci`: npm 11 leaves the other platforms'
# optional anvil binaries out of the lockfile, and `npm ci` then refuses it as out of sync.
$(NODE_STAMP): package.json package-lock.json
	npm install --no-audit --no-fund
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
# Two xdist workers (the machine has two cores), each with its own anvil chains on free ports.
PYTEST_WORKERS ?= 2

test: bootstrap lint ape
	$(BIN)/pytest -q -n $(PYTEST_WORKERS)

# One tier at a time (markers set in tests/conftest.py): unit needs no anvil and takes seconds.
test-unit: bootstrap
	$(BIN)/pytest -q -m unit

test-contracts: bootstrap
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) -m contracts

test-integration: bootstrap ape
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) -m integration

# The Ape deployment tooling (eth-ape, ape-foundry, ape-solidity, ape-base), in one step. It also
# lets ape-solidity find the compiler: the solc-js wrapper, where py-solc-x keeps solc versions
# (unless a native solc 0.8.30 is already there).
ape: $(APE_STAMP)

$(APE_STAMP): $(PY_STAMP) $(NODE_STAMP)
	$(BIN)/pip install --quiet -e '.[dev,seller,ape]'
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
