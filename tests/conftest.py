"""Test tiers and the fixture plugins.

Tiers (markers, set here from where a test lives and what it needs, so no test file has to say it):

    unit         no anvil, no network, no subprocess chain: pure functions, SQLite in tmp_path,
                 httpx.MockTransport, the ASGI stack in-process
    contracts    the contract itself on anvil (tests/contracts/)
    integration  everything else on anvil: the roles, uvicorn, processes, the CLI, the benchmarks, and
                 every test on the throwaway PostgreSQL server (the `db_url` fixture's postgresql half)
    slow         20 s or more alone on the two-core machine (crash and soak trials, the demo, Ape, the
                 benchmarks, the contract fuzzing, the fresh compile): in the integration and contracts tiers

A test is `integration` when it uses the `chain` fixture, when it lives in one of the files below
(they start their own anvil, ape or the CLI in subprocesses), or when it says so itself.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

pytest_plugins = [
    "fixtures.chain",
    "fixtures.cli",
    "fixtures.fake_chain",
    "fixtures.postgres",
    "fixtures.schedule",
    "fixtures.temproot",
]

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "contracts", "integration")

# Tests that need no `chain` fixture yet are not unit tests: their own anvil, the compiler, ape, subprocesses.
BY_PATH = {
    "contracts": ("contracts", "chain/test_artifacts.py"),
    "integration": (
        "bench",
        "integration",
        "deploy/test_deploy.py",
        "deploy/test_no_ape_at_runtime.py",
        "keeper/test_keeper_startup.py",
        "test_demo.py",
    ),
}


def _tier_by_path(path: Path) -> str | None:
    relative = path.relative_to(TESTS).as_posix()
    for tier, places in BY_PATH.items():
        if any(relative == place or relative.startswith(place + "/") for place in places):
            return tier
    return None


def _on_postgres(item: pytest.Item) -> bool:
    """The test starts (or shares) the session's throwaway PostgreSQL server."""
    callspec = getattr(item, "callspec", None)
    on_db_url = callspec is not None and callspec.params.get("db_url") == "postgresql"
    return on_db_url or "postgres_server" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        tier = _tier_by_path(item.path)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))
        elif (
            "_session_chain" in getattr(item, "fixturenames", ())
            or _on_postgres(item)
            or item.get_closest_marker("slow")
        ):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection built (every imported module, every test item: most of a worker's heap) lives until the
    end, so it is moved out of the collector's sight. Every full collection after it walked all of it again:
    with the whole suite collected, a worker spent 2.9 s of CPU in 20 full collections over a 25 s run (0.6 s
    with it frozen), and pytest collects five times more at its end to report unraisable exceptions.
    Objects made by the tests themselves, and their finalizers, are collected as before."""
    gc.collect()
    gc.freeze()
