"""A keyless seller sells through two facilitator replicas on one PostgreSQL; one is SIGKILLed mid-traffic.

Both replicas are `x402-escrow facilitator serve` processes (real uvicorn) on one PostgreSQL
database (the session's throwaway server), behind a round-robin proxy. The seller holds no key
and no RPC. Buyers resend the same payment after a 503 or the proxy's 502, as the buyer client
does. Nothing may be lost: every payment is served once (released with the hash of the bytes its
buyer got) or, when its handler failed, refunded once; the token's books balance; and the
operator key never sent two mined transactions for one intent.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, address
from seller.payer import quote, sign_payment
from seller.shop import served

from escrow_devtools.anvil import free_port
from escrow_devtools.bench.postgres import PostgresServer
from escrow_devtools.bench.scale import RoundRobinProxy
from escrow_py.chain.escrow import Delivered, Deposited, Refunded
from escrow_py.facilitator import KeyStore
from escrow_py.facilitator._tables import NAMESPACE
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import PAYMENT_RESPONSE_HEADER, PAYMENT_SIGNATURE_HEADER
from escrow_py.storage import open_database

from .process import FacilitatorProcess
from .test_api import wait_for
from .test_seller_mode import PRICE, shop

PAYMENTS = 24
FAILING = 4  # of which this many go to a handler that fails: refunded through the facilitator
AT_ONCE = 4


async def _pay(
    client: httpx.AsyncClient, chain: Chain, path: str, log: list[tuple[str, bytes, httpx.Response]]
) -> None:
    required = await quote(client, "GET", path)
    payment = sign_payment(chain, required)
    deadline = time.monotonic() + 90
    while True:
        response = await client.get(path, headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        if PAYMENT_RESPONSE_HEADER.lower() in response.headers:  # the seller's final answer (served or refunded)
            log.append((path, payment.escrow_id, response))
            return
        assert response.status_code in (502, 503), response.text  # the seller's own trouble: resend the same
        assert time.monotonic() < deadline, f"{path} never answered: {response.status_code} {response.text}"
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))


def _operator_txs_mined(chain: Chain, first: int, last: int) -> list[bytes]:
    operator = address(OPERATOR)
    mined: list[bytes] = []
    for n in range(first, last + 1):
        for tx in chain.w3.eth.get_block(n, full_transactions=True)["transactions"]:
            assert isinstance(tx, Mapping)  # full_transactions: each one's fields, not its hash
            if tx["from"] == operator:
                mined.append(bytes(tx["hash"]))
    return mined


@pytest.mark.slow
def test_two_replicas_on_postgresql_one_killed_mid_traffic_lose_nothing(
    chain: Chain, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    chain.mine()
    start_block = int(chain.w3.eth.block_number) + 1
    db = postgres_server.fresh()
    keys = KeyStore(db)
    _, key = keys.create("shop", [address(SELLER)])
    keys.close()
    token, escrow_address = chain.token, chain.escrow.address
    before = {who: token.balance_of(who) for who in (address(BUYER), address(SELLER), escrow_address)}
    replicas = [FacilitatorProcess(chain, db, free_port(), log_dir=tmp_path) for _ in range(2)]
    calls: dict[str, int] = {}
    paths = [f"/report/{i}" for i in range(PAYMENTS - FAILING)] + ["/fail"] * FAILING
    try:
        with RoundRobinProxy([r.url for r in replicas]) as proxy:
            app = shop(proxy.url, key, chain, tmp_path / "seller.sqlite", calls, replicas)
            with served(app) as (url, _server):
                got: list[tuple[str, bytes, httpx.Response]] = []

                async def traffic() -> None:
                    async with localhttp.AsyncClient(base_url=url, timeout=120) as client:
                        gate = asyncio.Semaphore(AT_ONCE)

                        async def one(path: str) -> None:
                            async with gate:
                                await _pay(client, chain, path, got)

                        tasks = [asyncio.create_task(one(p)) for p in paths]
                        while len(got) < PAYMENTS // 3:
                            await asyncio.sleep(0.05)
                        await asyncio.to_thread(replicas[0].kill)  # mid-traffic, requests in flight
                        await asyncio.gather(*tasks)

                asyncio.run(traffic())
                assert len(got) == PAYMENTS
                served_ok = [(i, r.content) for p, i, r in got if p != "/fail"]
                failed = [i for p, i, _ in got if p == "/fail"]
                assert all(r.status_code == 200 for p, _, r in got if p != "/fail")
                assert calls["report"] == PAYMENTS - FAILING  # one handler run per payment, none twice
                assert calls["fail"] == FAILING
                wait_for(lambda: all(chain.escrow.state_of(i) == State.RELEASED for i, _ in served_ok), timeout=120)
                wait_for(lambda: all(chain.escrow.state_of(i) == State.REFUNDED for i in failed), timeout=120)
    finally:
        for replica in replicas:
            replica.stop()
    last_block = int(chain.w3.eth.block_number)
    events = chain.escrow.events(start_block, last_block)
    ids = [i for _, i, _ in got]
    deposits = Counter(e.id for e in events if isinstance(e, Deposited))
    assert all(deposits[i] == 1 for i in ids), deposits  # deposited once each
    released = Counter(e.id for e in events if isinstance(e, Delivered))
    hashes = {e.id: e.delivery_hash for e in events if isinstance(e, Delivered)}
    assert all(released[i] == 1 and hashes[i] == delivery_hash(body) for i, body in served_ok)
    refunds = Counter(e.id for e in events if isinstance(e, Refunded))
    assert all(refunds[i] == 1 for i in failed) and not any(released[i] for i in failed)
    # The books: the buyer paid for what it was served, the seller got exactly that, the escrow holds none of it.
    paid = PRICE * len(served_ok)
    assert token.balance_of(address(BUYER)) == before[address(BUYER)] - paid
    assert token.balance_of(address(SELLER)) == before[address(SELLER)] + paid
    assert token.balance_of(escrow_address) == before[escrow_address]
    # The operator key: every mined transaction was recorded before broadcast, and no intent was mined twice.
    mined = _operator_txs_mined(chain, start_block, last_block)
    store = open_database(db, NAMESPACE)
    try:
        intents = {bytes(h): intent for h, intent in store.all("SELECT tx_hash, intent FROM operator_txs")}
    finally:
        store.close()
    assert mined and all(h in intents for h in mined)
    twice = [i for i, n in Counter(intents[h] for h in mined).items() if n > 1]
    assert twice == [], twice
