"""Several seller processes on one store and one operator key: real uvicorn processes, the session anvil.

What must hold however many processes serve: a payment is deposited once and its handler
runs once; every answer for it, duplicates and replays on any process included, carries
the bytes whose hash the chain committed; the operator key never collides with itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from pathlib import Path

import httpx
import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, address, dev

from escrow_devtools.anvil import dev_private_key
from escrow_devtools.bench.postgres import PostgresServer
from escrow_devtools.bench.replica import run_key
from escrow_devtools.bench.scale import (
    ChainSetup,
    ConnectionRoundRobin,
    LoadResult,
    Replicas,
    again,
    audit,
    handler_runs,
    nonce_errors_in,
    run_load,
    sign,
)
from escrow_py.chain.escrow import Delivered, Deposited
from escrow_py.chain.signer import LocalSigner
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import PAYMENT_REQUIRED_HEADER, PAYMENT_RESPONSE_HEADER, PAYMENT_SIGNATURE_HEADER
from escrow_py.seller import SellerStore


def setup_of(chain: Chain) -> ChainSetup:
    return ChainSetup(
        chain.node.url, chain.escrow.address, chain.token.address, address(SELLER), dev_private_key(OPERATOR)
    )


def funded_buyers(chain: Chain, count: int, tag: str) -> list[LocalSigner]:
    """`count` fresh buyer keys holding test USDC (buyers only sign: they need no ETH)."""
    buyers = [LocalSigner.from_key("0x" + hashlib.sha256(f"{tag}-{n}".encode()).hexdigest()) for n in range(count)]
    for buyer in buyers:
        chain.token.mint(chain.deployer, buyer.address, 10**9)
    return buyers


def wait_released(chain: Chain, ids: list[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(ids)
    while pending:
        pending = [i for i in pending if chain.escrow.state_of(i) != State.RELEASED]
        assert time.monotonic() < deadline, f"{len(pending)} served payments still not released"
        time.sleep(0.2)


def test_two_processes_on_one_sqlite_file_handle_a_payment_once(chain: Chain, tmp_path: Path) -> None:
    """10 copies of one payment sent to each of two processes at once: one deposit, one run, one body."""
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    replicas = Replicas(setup_of(chain), str(tmp_path / "seller.sqlite"), count=2, work_dir=tmp_path, work_seconds=0.3)
    try:
        quote = localhttp.get(replicas.urls[0] + "/report/once", timeout=10)
        header, escrow_id = sign(dev(BUYER), quote.headers[PAYMENT_REQUIRED_HEADER], chain.now())

        async def send_all() -> list[httpx.Response]:
            async with localhttp.AsyncClient(timeout=60) as client:

                async def one(url: str) -> httpx.Response:
                    deadline = time.monotonic() + 45
                    while True:
                        answer = await client.get(url + "/report/once", headers={PAYMENT_SIGNATURE_HEADER: header})
                        if answer.status_code != 503 or time.monotonic() > deadline:
                            return answer
                        await asyncio.sleep(0.2)

                return await asyncio.gather(*(one(url) for url in replicas.urls for _ in range(10)))

        answers = asyncio.run(send_all())
        assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers if a.status_code != 200]
        wait_released(chain, [escrow_id])
        events = chain.escrow.events(start, int(chain.w3.eth.block_number))
        assert sum(1 for e in events if isinstance(e, Deposited)) == 1
        committed = next(e.delivery_hash for e in events if isinstance(e, Delivered))
        runs, _ = handler_runs(replicas.runs_dir)
        assert runs[run_key(header)] == 1, "the handler ran more than once for one payment"
        assert {delivery_hash(a.content) for a in answers} == {committed}
        replay = localhttp.get(
            replicas.urls[1] + "/report/once", headers={PAYMENT_SIGNATURE_HEADER: header}, timeout=30
        )
        assert replay.status_code == 200 and delivery_hash(replay.content) == committed
    finally:
        replicas.stop()


@pytest.mark.slow
def test_uvicorn_two_workers_on_sqlite_serve_20_buyers_10_requests_each(chain: Chain, tmp_path: Path) -> None:
    """`uvicorn --workers 2` on the embedded SQLite store: every one of 200 paid requests succeeds."""
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    buyers = funded_buyers(chain, 20, "workers")
    replicas = Replicas(setup_of(chain), str(tmp_path / "seller.sqlite"), count=1, workers=2, work_dir=tmp_path)
    try:
        load = asyncio.run(
            run_load(replicas.urls[0], replicas.urls, buyers, requests_per_buyer=10, chain_now=chain.now())
        )
        assert load.failed == []
        assert load.ok == 200
        wait_released(chain, list(load.ids.values()))
        checked = audit(chain.escrow, start, load, replicas.runs_dir)
        log_errors = nonce_errors_in(replicas.log_text())
    finally:
        replicas.stop()
    assert load.nonce_errors == 0 and log_errors == 0
    assert set(checked.deposits.values()) == {1} and len(checked.deposits) == 200
    assert checked.duplicate_runs == 0
    assert checked.mismatched == 0


def test_the_load_sends_a_payment_again_only_when_no_seller_answered_it() -> None:
    """A 503 and a 502 without PAYMENT-RESPONSE (a transport error, a replica killed mid-request) are sent again;
    a 502 with it is the seller's answer for a failed handler (refunded) and final, as is any other answer."""
    settled = {PAYMENT_RESPONSE_HEADER: "e30="}
    assert again(httpx.Response(503)) and again(httpx.Response(502, content=b"transport error"))
    assert not again(httpx.Response(502, headers=settled))
    assert not any(again(httpx.Response(status, headers=settled)) for status in (200, 402))


# -- three replicas on PostgreSQL behind a round-robin balancer (a connection per request) ----------------------

FAST_TAKEOVER = {"claim_seconds": 3.0, "claim_wait": 2.0, "poster_lease": 2.0}


@pytest.mark.slow
@pytest.mark.timeout(900)  # about a minute and a half alone on 2 cores; minutes when the machine is shared
def test_three_replicas_on_postgres_500_payments_with_duplicates_replays_and_a_crash(
    chain: Chain, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """50 buyers x 10 payments through a round-robin balancer; copies and replays go to other replicas;
    one replica is SIGKILLed mid-traffic. Each payment: one deposit, one handler run (bar a run the dead
    replica started and never answered), every 200 the bytes the chain committed, no nonce collision."""
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    buyers = funded_buyers(chain, 50, "pg3")
    replicas = Replicas(
        setup_of(chain), postgres_server.fresh(), count=3, work_dir=tmp_path, work_seconds=0.2, seller=FAST_TAKEOVER
    )
    killed: list[int] = []

    def kill_midway(progress: LoadResult) -> None:
        if not killed and progress.ok >= 150:
            killed.append(replicas.processes[2].pid)
            replicas.kill(2)

    try:
        with ConnectionRoundRobin(replicas.urls) as proxy:
            load = asyncio.run(
                run_load(
                    proxy.url,
                    replicas.urls[:2],  # copies and replays go straight to the replicas that stay up
                    buyers,
                    requests_per_buyer=10,
                    chain_now=chain.now(),
                    duplicate_every=7,
                    replay_every=3,
                    fail_every=25,
                    on_progress=kill_midway,
                )
            )
        assert killed, "the replica was not killed"
        assert load.failed == []
        assert len(load.latencies) == 500
        served = [load.ids[k] for k in load.bodies]
        wait_released(chain, served, timeout=90)
        checked = audit(chain.escrow, start, load, replicas.runs_dir)
        log_errors = nonce_errors_in(replicas.log_text())
    finally:
        replicas.stop()
    assert load.nonce_errors == 0 and log_errors == 0
    assert len(checked.deposits) == 500 and set(checked.deposits.values()) == {1}
    assert checked.mismatched == 0
    # Handler runs: once per payment, except one the dead replica started and never answered (then once more).
    _, by_pid = handler_runs(replicas.runs_dir)
    dead = by_pid.get(str(killed[0]), Counter())
    for key in load.ids:
        survivors = sum(runs[key] for pid, runs in by_pid.items() if pid != str(killed[0]))
        assert survivors + dead[key] >= 1, "a payment was never handled"
        assert survivors <= 1, "a payment was handled twice by live replicas"
        if dead[key]:
            assert dead[key] == 1
    # The failing route's payments were refunded, once each.
    failing = [load.ids[k] for k in load.ids if k not in load.bodies]
    assert len(failing) == 20
    deadline = time.monotonic() + 60
    while any(chain.escrow.state_of(i) != State.REFUNDED for i in failing):
        assert time.monotonic() < deadline, "failed handlers' payments not refunded"
        time.sleep(0.2)


def test_the_poster_lease_moves_to_another_replica_within_seconds_of_its_holder_dying(
    chain: Chain, tmp_path: Path, postgres_server: PostgresServer
) -> None:
    chain.mine()
    url = postgres_server.fresh()
    replicas = Replicas(setup_of(chain), url, count=2, work_dir=tmp_path, seller=FAST_TAKEOVER)
    store = SellerStore(url)
    lease = f"poster:{address(OPERATOR)}"
    try:
        deadline = time.monotonic() + 20
        while (held := store.lease_holder(lease)) is None:
            assert time.monotonic() < deadline, "no poster took the lease"
            time.sleep(0.05)
        pids = [p.pid for p in replicas.processes]
        holder = pids.index(int(held[0].split(":")[1]))
        replicas.kill(holder)
        died = time.monotonic()
        while True:
            held = store.lease_holder(lease)
            if held is not None and int(held[0].split(":")[1]) == pids[1 - holder]:
                break
            assert time.monotonic() - died < 10, f"the lease is still {held} after 10 s"
            time.sleep(0.05)
        took = time.monotonic() - died
        assert took < FAST_TAKEOVER["poster_lease"] + 2.0, f"took {took:.1f}s"
        # The survivor posts: a payment it serves is released with no other poster alive.
        quote = localhttp.get(replicas.urls[1 - holder] + "/report/after", timeout=10)
        header, escrow_id = sign(dev(BUYER), quote.headers[PAYMENT_REQUIRED_HEADER], chain.now())
        paid = localhttp.get(
            replicas.urls[1 - holder] + "/report/after", headers={PAYMENT_SIGNATURE_HEADER: header}, timeout=60
        )
        assert paid.status_code == 200, paid.text
        wait_released(chain, [escrow_id], timeout=20)
    finally:
        store.close()
        replicas.stop()
