"""A keyless seller sells through two facilitator replicas on one database; one is SIGKILLed mid-traffic.

Both replicas are `x402-escrow facilitator serve` processes on one SQLite file (the
embedded engine; PostgreSQL is not wired into the facilitator's stores yet), behind a
round-robin proxy. Buyers resend the same payment after a 503 or 502, as the buyer client
does. Nothing may be lost: every payment is served once, deposited once and released
with the hash of the bytes its buyer got.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
from fixtures.chain import Chain
from helpers import SELLER, address
from seller.payer import quote, sign_payment
from seller.shop import served

from escrow_devtools.anvil import free_port
from escrow_devtools.bench.scale import RoundRobinProxy
from escrow_py.chain.escrow import Delivered, Deposited
from escrow_py.facilitator import KeyStore
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER

from .process import FacilitatorProcess
from .test_api import wait_for
from .test_seller_mode import shop

PAYMENTS = 24
AT_ONCE = 4


async def _pay(client: httpx.AsyncClient, chain: Chain, item: int, log: list[tuple[bytes, bytes]]) -> None:
    required = await quote(client, "GET", f"/report/{item}")
    payment = sign_payment(chain, required)
    deadline = time.monotonic() + 90
    while True:
        response = await client.get(f"/report/{item}", headers={PAYMENT_SIGNATURE_HEADER: payment.header})
        if response.status_code == 200:
            log.append((payment.escrow_id, response.content))
            return
        assert response.status_code in (502, 503), response.text  # the seller's own trouble: resend the same
        assert time.monotonic() < deadline, f"payment {item} never served: {response.status_code} {response.text}"
        await asyncio.sleep(float(response.headers.get("retry-after", "1")))


def test_two_replicas_one_killed_mid_traffic_lose_nothing(chain: Chain, tmp_path: Path) -> None:
    chain.mine()
    start_block = int(chain.w3.eth.block_number) + 1
    db = tmp_path / "facilitator.sqlite"
    keys = KeyStore(db)
    _, key = keys.create("shop", [address(SELLER)])
    keys.close()
    replicas = [FacilitatorProcess(chain, db, free_port()) for _ in range(2)]
    calls: dict[str, int] = {}
    try:
        with RoundRobinProxy([r.url for r in replicas]) as proxy:
            app = shop(proxy.url, key, chain, tmp_path / "seller.sqlite", calls, replicas)
            with served(app) as (url, _server):
                got: list[tuple[bytes, bytes]] = []

                async def traffic() -> None:
                    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                        gate = asyncio.Semaphore(AT_ONCE)

                        async def one(item: int) -> None:
                            async with gate:
                                await _pay(client, chain, item, got)

                        tasks = [asyncio.create_task(one(i)) for i in range(PAYMENTS)]
                        while len(got) < PAYMENTS // 3:
                            await asyncio.sleep(0.05)
                        await asyncio.to_thread(replicas[0].kill)  # mid-traffic, requests in flight
                        await asyncio.gather(*tasks)

                asyncio.run(traffic())
                assert len(got) == PAYMENTS
                assert calls["report"] == PAYMENTS  # one handler run per payment, none twice
                ids = [i for i, _ in got]
                wait_for(lambda: all(chain.escrow.state_of(i) == State.RELEASED for i in ids), timeout=120)
    finally:
        for replica in replicas:
            replica.stop()
    events = chain.escrow.events(start_block, int(chain.w3.eth.block_number))
    deposits = Counter(e.id for e in events if isinstance(e, Deposited))
    assert all(deposits[i] == 1 for i in ids), deposits  # deposited once each
    released = {e.id: e.delivery_hash for e in events if isinstance(e, Delivered)}
    assert all(released[i] == delivery_hash(body) for i, body in got)  # the bytes each buyer got
