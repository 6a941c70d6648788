"""The bench tests' fixture: a benchmark command run through the CLI's entry point in the test's process."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest
from fixtures.cli import InProcessCli

Bench = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def bench(in_process_cli: InProcessCli) -> Bench:
    """`x402-escrow bench ARGS` in this process (fixtures.cli): a measuring run is tested for what it prints;
    the refusals of bad settings still run the command as its own process."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return in_process_cli("bench", *args)

    return run
