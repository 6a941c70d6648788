"""The bench tests' fixture: a benchmark command run through the CLI's entry point in the test's process."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from escrow_py import cli

Bench = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def bench(capsys: pytest.CaptureFixture[str]) -> Bench:
    """`x402-escrow bench ARGS` through `escrow_py.cli.main` in this process: its exit status and output.

    A measuring run is tested for what it prints, and a process of its own would import web3, the seller and
    the x402 SDK again (seconds of CPU per test). Its anvil, servers and keepers are the same real processes
    either way; the refusals of bad settings still run the command as its own process.
    """

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        capsys.readouterr()  # nothing printed before belongs to the run
        argv = ["bench", *args]
        code = cli.main(argv)
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, printed.out, printed.err)

    return run
