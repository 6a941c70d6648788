"""The runtime package never imports ape: deployment tooling stays out of buyers', sellers' and keepers' processes."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_importing_every_module_of_the_package_loads_no_ape() -> None:
    code = (
        "import pkgutil, sys, importlib, escrow_py\n"
        "for m in pkgutil.walk_packages(escrow_py.__path__, 'escrow_py.'):\n"
        "    importlib.import_module(m.name)\n"
        "loaded = sorted(n for n in sys.modules if n == 'ape' or n.startswith(('ape.', 'ape_')))\n"
        "print(len(list(pkgutil.walk_packages(escrow_py.__path__, 'escrow_py.'))), loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    count, loaded = out.stdout.strip().split(" ", 1)
    assert int(count) > 20
    assert loaded == "[]"


def test_the_suite_runs_without_apes_pytest_plugin(pytestconfig: pytest.Config) -> None:
    # Ape's plugin connects to a network at start-up and costs seconds per run; pyproject disables it.
    assert pytestconfig.pluginmanager.get_plugin("ape_test") is None
    assert "ape.pytest.plugin" not in sys.modules
