"""Test tiers and the fixture plugins.

Tiers (markers, set here from where a test lives and what it needs, so no test file has to say it):

    unit         no anvil, no network, no subprocess chain: pure functions, SQLite in tmp_path,
                 httpx.MockTransport, the ASGI stack in-process
    contracts    the contract itself on anvil (tests/contracts/)
    integration  everything else on anvil: the roles, uvicorn, processes, the CLI, the benchmarks
    slow         the long ones (crash and soak trials), a subset of integration

A test needs anvil when it uses the `chain` fixture, or when its module says so with
`pytestmark = pytest.mark.integration` (the ones that start their own anvil).
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["fixtures.chain"]

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "contracts", "integration")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        if TESTS / "contracts" in item.path.parents:
            item.add_marker(pytest.mark.contracts)
        elif "_session_chain" in getattr(item, "fixturenames", ()) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)
