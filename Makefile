# Everything bootstraps from nothing: python3, node and npm are all a machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY_STAMP   := $(VENV)/.installed-dev
RUN_STAMP  := $(VENV)/.installed-run
APE_STAMP  := $(VENV)/.installed-ape
NODE_STAMP := node_modules/.installed

# Installs go through uv (from PyPI, pinned, into the venv) when it can be had, and through pip
# otherwise (or with INSTALLER=pip): uv resolves, downloads and installs the same set several times
# faster, and this machine's pip caches nothing between runs. Neither prints progress bars (they
# garble logs); pip prints a line per package as it goes, uv one per package installed at the end.
UV_VERSION := 0.13.8
INSTALLER  ?= uv
PIP_INSTALL := $(BIN)/pip install --progress-bar off --disable-pip-version-check
# What each stamp installs: the quickstart's run set, the dev set, the dev set with the Ape tooling.
RUN_EXTRAS := seller,mcp
DEV_EXTRAS := dev,seller,postgres,mcp
APE_EXTRAS := $(DEV_EXTRAS),ape
# $(call install,EXTRAS): the package, editable, with those extras (uv without bytecode: see
# bytecode-cache).
install = if [ -x $(BIN)/uv ]; then $(BIN)/uv pip install --python $(BIN)/python -e '.[$(1)]'; \
	else $(PIP_INSTALL) -e '.[$(1)]'; fi

.PHONY: bootstrap quickstart test test-deps bytecode-cache test-unit test-contracts test-integration test-console lint format artifacts demo bench ape clean

bootstrap: $(PY_STAMP) $(NODE_STAMP)

# What running the package needs (seller, buyer, keeper, MCP tools, a local chain), without the
# dev tools: the README's quickstart. uv (or pip) and npm run side by side: both mostly wait on downloads.
quickstart:
	$(MAKE) -j2 $(RUN_STAMP) $(NODE_STAMP)

# With uv: a venv without pip (ensurepip unpacks and compiles pip: 5-6 s of CPU), the system's pip
# puts uv in it, and uv puts pip in it (under a second) for whoever wants one. Otherwise, or if any
# of that fails (no pip beside $(PYTHON), older than 22.3, uv not installable), a venv with pip.
$(BIN)/python:
	@echo "== creating $(VENV)"
	if [ "$(INSTALLER)" = uv ] && $(PYTHON) -m venv --without-pip $(VENV) \
		&& $(PYTHON) -m pip --python $(BIN)/python install --quiet --disable-pip-version-check uv==$(UV_VERSION) \
		&& $(BIN)/uv pip install --quiet --python $(BIN)/python pip; then :; else \
		echo "== installing with pip (uv: INSTALLER=$(INSTALLER), or not installable)"; \
		rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) && $(PIP_INSTALL) --quiet --upgrade pip; fi

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	@echo "== installing x402-escrow with the seller and MCP extras into $(VENV)"
	$(call install,$(RUN_EXTRAS))
	touch $@

$(PY_STAMP): pyproject.toml | $(BIN)/python
	@echo "== installing x402-escrow with the dev tools into $(VENV)"
	$(call install,$(DEV_EXTRAS))
	touch $@

# solc-js (the compiler) and anvil (the local chain) both come from npm, pinned exactly in
# package.json and package-lock.json. Not `npm ci`: npm 11 leaves the other platforms'
# optional anvil binaries out of the lockfile, and `npm ci` then refuses it as out of sync.
# --prefer-offline: what the npm cache holds is taken without asking the registry again (the
# lockfile pins every version and its hash); with a warm cache that is 5 s instead of 30 here.
# --ignore-scripts: no package's install script runs. The one that has one (@foundry-rs/anvil's
# postinstall) only checks for, or downloads, the platform binary that npm has already installed
# as an optional dependency; escrow_devtools.anvil runs that binary directly.
$(NODE_STAMP): package.json package-lock.json
	@echo "== installing solc-js and anvil from npm into node_modules"
	npm install --ignore-scripts --prefer-offline --no-audit --no-fund --loglevel=http
	touch $@

# The lint steps run side by side (LINT_JOBS at once), each one's output printed whole when it ends,
# every one to its end even when another fails (so one run lists every failure).
# The longest is mypy (the package and the tools, then the tests, which reuse the package's cache):
# about 20 s of one core; Slither (about 6 s) and ruff run beside it on the other.
# Slither runs on contracts/ through the solc-js wrapper; every finding must be triaged, with its
# reason, in slither.triage.toml (scripts/slither_check.py fails on a new or a stale one).
LINT_JOBS ?= 4
LINT_PATHS := escrow_py escrow_devtools tests scripts examples
LINT_STEPS := lint-ruff lint-format lint-mypy lint-slither
.PHONY: $(LINT_STEPS)

# Runs its goals side by side, each one's output whole, every one to its end.
SIDE_BY_SIDE = $(MAKE) -j$(LINT_JOBS) --keep-going --output-sync=target --no-print-directory

lint: bootstrap
	$(SIDE_BY_SIDE) $(LINT_STEPS)

lint-ruff:
	$(BIN)/ruff check $(LINT_PATHS)

lint-format:
	$(BIN)/ruff format --check $(LINT_PATHS)

lint-mypy:
	$(BIN)/mypy
	MYPYPATH=tests $(BIN)/mypy --explicit-package-bases tests

lint-slither:
	$(BIN)/python scripts/slither_check.py

format: bootstrap
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

# Recompile contracts/ into the runtime's artifacts (escrow_py/chain/artifacts/) and the tools'
# (escrow_devtools/artifacts/).
artifacts: bootstrap
	$(BIN)/x402-escrow contracts build

# Everything, the Ape deployment test included (ape's own pytest plugin stays disabled:
# the deploy test drives `ape run deploy` in a subprocess).
# Six xdist workers on two cores: much of the suite waits (on blocks, deadlines, leases lapsing,
# processes starting, other processes' answers), and the extra workers run tests in that idle time.
# Measured back to back on the quiet machine: four kept the cores 82% busy (pytest 249 s), six 97%
# (179 s), eight 99% with more CPU spent (195 s). Each worker has its own anvil chains on free ports. The longest tests go first (tests/durations.json,
# tests/fixtures/schedule.py) and `--maxschedchunk 1` hands each free worker the next one, so no long
# test starts last. The 25 slowest tests are listed at the end, where the time goes.
PYTEST_WORKERS ?= 6
PYTEST_XDIST   := -n $(PYTEST_WORKERS) --maxschedchunk 1
# Some sandboxes and containers set PYTHONDONTWRITEBYTECODE: then each of the hundreds of processes the
# suite starts (CLI runs, replicas, keepers, agents) compiles the package from source again, and each
# xdist worker rewrites every test module's asserts again (collection 9.9 s of CPU per worker instead of
# 4.2). The test runs write their bytecode caches (__pycache__, ignored by git) as Python does by default.
PYTEST := PYTHONDONTWRITEBYTECODE= $(BIN)/pytest

# One install of everything (the dev tools and the Ape tooling together) with npm beside it; then the
# lint steps side by side, and beside them one collection of the suite (bytecode-cache), then the suite.
test: test-deps
	$(SIDE_BY_SIDE) $(LINT_STEPS) bytecode-cache
	$(PYTEST) -q $(PYTEST_XDIST) --durations=25

test-deps:
	$(MAKE) -j2 --no-print-directory $(APE_STAMP) $(NODE_STAMP)

# uv writes no bytecode at install (compiling all 7,400 files of the venv is 30 s of CPU, most of them
# never imported), and $(PYTEST) lets Python write it as it goes; but six xdist workers starting at once
# would each compile the same imports and rewrite the same test modules' asserts (51 s of CPU for the four,
# 20 s once the caches are there). One collection first (16 s of CPU), beside the lint steps (mypy
# keeps one core busy, the other is mostly idle), writes those caches once.
bytecode-cache:
	$(PYTEST) -q --collect-only > /dev/null

# One tier at a time (markers set in tests/conftest.py): unit needs no anvil and takes seconds.
test-unit: bootstrap
	$(PYTEST) -q -m unit

test-contracts: bootstrap
	$(PYTEST) -q $(PYTEST_XDIST) -m contracts

test-integration: ape bootstrap
	$(PYTEST) -q $(PYTEST_XDIST) -m integration

# The operator console's browser test drives Debian's chromium through Playwright (no browser
# download); chromium is installed from the distribution if missing (needs root).
test-console: bootstrap
	command -v chromium >/dev/null || apt-get install -y chromium
	$(PYTEST) -q tests/facilitator/test_console.py

# The Ape deployment tooling (eth-ape, ape-foundry, ape-solidity, ape-base), installed with the dev
# set in one step (a superset of bootstrap's, so it stamps that one too: listed before `bootstrap`,
# `ape` leaves it nothing to do). It also lets ape-solidity find the compiler: the solc-js wrapper,
# where py-solc-x keeps solc versions (unless a native solc 0.8.30 is already there), which runs on
# node_modules' solc.
ape: $(APE_STAMP) $(NODE_STAMP)

$(APE_STAMP): pyproject.toml | $(BIN)/python
	@echo "== installing x402-escrow with the dev tools and the Ape deployment tooling into $(VENV)"
	$(call install,$(APE_EXTRAS))
	mkdir -p $(HOME)/.solcx
	if [ -L $(HOME)/.solcx/solc-v0.8.30 ] || [ ! -e $(HOME)/.solcx/solc-v0.8.30 ]; then \
		ln -sfn $(CURDIR)/scripts/solc-js.cjs $(HOME)/.solcx/solc-v0.8.30; fi
	touch $(PY_STAMP) $@

demo: bootstrap
	$(BIN)/x402-escrow demo

bench: bootstrap
	$(BIN)/x402-escrow bench gas --json
	$(BIN)/x402-escrow bench http --json

clean:
	rm -rf $(VENV) node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis .build
