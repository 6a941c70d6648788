"""The rate limit per API key is one limit, whichever replica a request reaches.

It lives in the facilitator's database (KeyStore.take), so N replicas allow what one does, not N
times it. Tested on the store (both engines) and with two real `facilitator serve` processes on one
PostgreSQL, requests alternating between them.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import SELLER, SELLER2, address

from escrow_devtools.anvil import free_port
from escrow_devtools.bench.postgres import PostgresServer
from escrow_py.facilitator import KeyStore

from .process import FacilitatorProcess

BURST = 8
RATE = 0.01  # one request refilled every 100 s: none during a test, however loaded the machine


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
def test_a_key_gets_its_burst_then_waits_and_another_key_is_not_touched(db_url: str) -> None:
    first, second = KeyStore(db_url), KeyStore(db_url)  # two replicas' stores on one database
    try:
        waits = [(first if n % 2 else second).take("k1", rate=RATE, burst=BURST) for n in range(BURST + 3)]
        assert waits[:BURST] == [0.0] * BURST
        # Refused past the burst, each told how long until one more is refilled (100 s at this rate).
        assert all(1 / RATE - 30 < w <= 1 / RATE + 1 for w in waits[BURST:]), waits
        assert first.take("k2", rate=RATE, burst=BURST) == 0.0  # per key
        # The bucket refills: once the burst is spent, one more is allowed after the wait it was told.
        assert second.take("k3", rate=0.5, burst=1) == 0.0
        wait = first.take("k3", rate=0.5, burst=1)
        assert 0 < wait <= 2.0
        time.sleep(wait + 0.05)
        assert second.take("k3", rate=0.5, burst=1) == 0.0
    finally:
        first.close()
        second.close()


def test_two_replicas_on_one_postgresql_share_each_keys_limit(
    chain: Chain, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    db = postgres_server.fresh()
    keys = KeyStore(db)
    key_id, key = keys.create("shop", [address(SELLER)])
    _, other = keys.create("other shop", [address(SELLER2)])
    keys.close()
    flags = ("--rate", str(RATE), "--burst", str(BURST))
    replicas = [FacilitatorProcess(chain, db, free_port(), *flags, log_dir=tmp_path) for _ in range(2)]
    unknown = "0x" + os.urandom(32).hex()
    try:

        def ask(n: int, presented: str) -> httpx.Response:
            url = f"{replicas[n % 2].url}/escrows/{unknown}"  # alternating: each replica sees half the requests
            return localhttp.get(url, headers={"Authorization": f"Bearer {presented}"}, timeout=30)

        # A stranger naming the key's id with a wrong secret is refused and spends none of its limit.
        forged = f"x4f_{key_id}_{secrets.token_urlsafe(32)}"
        assert {ask(n, forged).status_code for n in range(2 * BURST)} == {401}
        answers = [ask(n, key) for n in range(2 * BURST)]
        statuses = [a.status_code for a in answers]
        # The burst once across both replicas (404: authenticated, an escrow never settled here), then 429:
        # each replica counting alone would have let 2 * BURST through.
        assert statuses == [404] * BURST + [429] * BURST, statuses
        for refused in answers[BURST:]:
            assert refused.json()["error"] == "rate_limited"
            assert 1 <= int(refused.headers["retry-after"]) <= 1 / RATE + 1
        assert ask(0, other).status_code == 404 and ask(1, other).status_code == 404  # another key: its own limit
    finally:
        for replica in replicas:
            replica.stop()
