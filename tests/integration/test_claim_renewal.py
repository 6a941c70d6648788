"""A payment's claim outlives a slow handler, and a replica that lost it neither serves nor writes.

Two real uvicorn replicas on one store (a SQLite file, then a PostgreSQL database), the session
anvil, a lease of one second: far shorter than the handler. The claim must be renewed while its
holder is alive whatever the holder's event loop is doing, so a copy of the payment sent to the
other replica meanwhile waits (or gets 503 payment_in_progress) instead of taking the payment over
and running the handler a second time. A holder that was paused (SIGSTOP) past its lease and
taken over must, once it resumes, write nothing and serve nothing of its own: the replica that
took over is the one whose bytes are stored, served, replayed and committed on chain.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import localhttp
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, address, dev

from escrow_devtools.anvil import dev_private_key
from escrow_devtools.bench.replica import run_key
from escrow_devtools.bench.scale import ChainSetup, Replicas, handler_runs, sign
from escrow_py.chain.escrow import Delivered
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import PAYMENT_REQUIRED_HEADER, PAYMENT_SIGNATURE_HEADER
from escrow_py.storage import open_database

# A lease far shorter than the handler, renewed three times a lease by a live holder.
SHORT_CLAIM = {"claim_seconds": 1.0, "poster_lease": 2.0}


def setup_of(chain: Chain) -> ChainSetup:
    return ChainSetup(
        chain.node.url, chain.escrow.address, chain.token.address, address(SELLER), dev_private_key(OPERATOR)
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def runs_in(replicas: Replicas, key: str, pid: int | None = None) -> int:
    total, by_pid = handler_runs(replicas.runs_dir)
    return total[key] if pid is None else by_pid.get(str(pid), Counter())[key]


def until_answered(url: str, header: str, seen: list[int], timeout: float = 60.0) -> httpx.Response:
    """Send the payment to `url` until it is answered (a 503 payment_in_progress is sent again); every status seen."""
    deadline = time.monotonic() + timeout
    while True:
        answer = localhttp.get(url, headers={PAYMENT_SIGNATURE_HEADER: header}, timeout=timeout)
        seen.append(answer.status_code)
        if answer.status_code != 503 or time.monotonic() > deadline:
            return answer
        assert answer.json().get("error") == "payment_in_progress", answer.text
        time.sleep(0.1)


def committed_hash(chain: Chain, escrow_id: bytes, start: int, timeout: float = 60.0) -> bytes:
    wait_for(lambda: chain.escrow.state_of(escrow_id) == State.RELEASED, "the delivery to be released", timeout)
    events = chain.escrow.events(start, int(chain.w3.eth.block_number))
    return next(e.delivery_hash for e in events if isinstance(e, Delivered) and e.id == escrow_id)


def paid_header(chain: Chain, url: str) -> tuple[str, bytes]:
    quote = localhttp.get(url, timeout=30)
    assert quote.status_code == 402, quote.text
    return sign(dev(BUYER), quote.headers[PAYMENT_REQUIRED_HEADER], chain.now())


def test_a_handler_blocking_its_event_loop_past_the_lease_runs_once_while_a_copy_waits(
    chain: Chain, tmp_path: Path, db_url: str
) -> None:
    """Replica A's handler blocks A's event loop for three leases (sync work in an async handler). A copy of
    the payment sent to replica B meanwhile must not find the claim lapsed: the handler runs once, B's copy
    waits or gets 503 payment_in_progress, then B answers A's bytes, and every replay is those bytes."""
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    replicas = Replicas(
        setup_of(chain), db_url, count=2, work_dir=tmp_path, work_seconds=3.0, blocking_work=True,
        seller={**SHORT_CLAIM, "claim_wait": 1.5},
    )  # fmt: skip
    a, b = (url + "/report/slow" for url in replicas.urls)
    try:
        header, escrow_id = paid_header(chain, a)
        key = run_key(header)
        with ThreadPoolExecutor(1) as pool:
            first: Future[httpx.Response] = pool.submit(
                httpx.get, a, headers={PAYMENT_SIGNATURE_HEADER: header}, timeout=60
            )
            wait_for(lambda: runs_in(replicas, key) == 1 or first.done(), "replica A's handler to start")
            time.sleep(1.2)  # past A's lease: without renewal the claim has lapsed by now
            seen: list[int] = []
            copy = until_answered(b, header, seen)
            answer = first.result()
        assert answer.status_code == 200, answer.text
        assert runs_in(replicas, key) == 1, "the handler ran again on the replica that got the copy"
        assert set(seen) <= {200, 503}
        assert copy.status_code == 200 and copy.content == answer.content
        for url in (a, b):
            replay = localhttp.get(url, headers={PAYMENT_SIGNATURE_HEADER: header}, timeout=30)
            assert replay.status_code == 200 and replay.content == answer.content
        assert committed_hash(chain, escrow_id, start) == delivery_hash(answer.content)
        assert runs_in(replicas, key) == 1
    finally:
        replicas.stop()


def _holds_a_transaction_open(db_url: str) -> bool:
    """Whether some connection is inside a write transaction (a paused process would keep its locks)."""
    if db_url.startswith("sqlite"):
        probe = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0.3, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()
    db = open_database(db_url, "probe")
    try:
        row = db.one("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'")
        return row is not None and int(row[0]) > 0
    finally:
        db.close()


def pause(pid: int, db_url: str) -> None:
    """SIGSTOP `pid` at a moment it holds no transaction open (a paused holder of SQLite's write lock
    would stop every replica: that is SQLite's limit, not what this test is about)."""
    for _ in range(50):
        os.kill(pid, signal.SIGSTOP)
        if not _holds_a_transaction_open(db_url):
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    raise AssertionError("could not pause the replica outside a transaction")


def body_pid(response: httpx.Response) -> int:
    payload: dict[str, Any] = json.loads(response.content)
    return int(payload["pid"])


def test_a_paused_replica_that_lost_its_claim_neither_writes_nor_serves_its_own_response(
    chain: Chain, tmp_path: Path, db_url: str
) -> None:
    """Replica A is SIGSTOPped inside the handler, past its lease; replica B takes the payment over (A looks
    dead) and starts the handler. A resumes before B has answered: A must not store its response (B's
    would then be refused) nor send its own bytes; what is stored, served, replayed and committed is B's."""
    chain.mine()
    start = int(chain.w3.eth.block_number) + 1
    replicas = Replicas(
        setup_of(chain), db_url, count=2, work_dir=tmp_path, work_seconds=2.0, seller={**SHORT_CLAIM, "claim_wait": 20}
    )
    a_pid, b_pid = (p.pid for p in replicas.processes)
    a, b = (url + "/report/paused" for url in replicas.urls)
    resumed = False
    try:
        header, escrow_id = paid_header(chain, a)
        key = run_key(header)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.get, a, headers={PAYMENT_SIGNATURE_HEADER: header}, timeout=90)
            wait_for(lambda: runs_in(replicas, key, a_pid) == 1, "replica A's handler to start")
            pause(a_pid, db_url)
            seen: list[int] = []
            copy = pool.submit(until_answered, b, header, seen, 90.0)
            wait_for(lambda: runs_in(replicas, key, b_pid) == 1, "replica B to take the payment over")
            os.kill(a_pid, signal.SIGCONT)  # A's handler is done at once (its sleep ran out while paused)
            resumed = True
            answer_a, answer_b = first.result(), copy.result()
        assert answer_b.status_code == 200 and body_pid(answer_b) == b_pid, answer_b.text
        # A answers what B stored (or that the payment is in progress), never bytes of its own run.
        assert answer_a.status_code in (200, 503), answer_a.text
        if answer_a.status_code == 200:
            assert answer_a.content == answer_b.content
        else:
            assert answer_a.json().get("error") == "payment_in_progress"
        for url in (a, b):
            replay = localhttp.get(url, headers={PAYMENT_SIGNATURE_HEADER: header}, timeout=30)
            assert replay.status_code == 200 and replay.content == answer_b.content
        assert committed_hash(chain, escrow_id, start) == delivery_hash(answer_b.content)
        assert runs_in(replicas, key) == 2  # A's run, cut off by the pause, and B's after the takeover
        assert "lost" in replicas.logs[0].read_text(errors="replace")
    finally:
        if not resumed:
            os.kill(a_pid, signal.SIGCONT)
        replicas.stop()
