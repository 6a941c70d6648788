"""Issue 3's flows end to end on loopback: uvicorn, real processes killed with SIGKILL, the session anvil.

Every test ends on the books: the sum of balances unchanged, the escrow holding exactly what is Held.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import localhttp
import pytest
from fixtures.chain import Chain
from helpers import BUYER, SELLER, address, dev
from x402.http.utils import decode_payment_required_header
from x402.schemas import PaymentRequired

from escrow_devtools.anvil import dev_private_key, free_port
from escrow_devtools.demo._shop import REPORT_PRICE
from escrow_py.buyer import (
    EscrowClient,
    HandlerFailedRefunded,
    Journal,
    PaymentState,
    delivered_hash,
    recover,
)
from escrow_py.chain.escrow import Deposited
from escrow_py.protocol.terms import State, delivery_hash
from escrow_py.protocol.wire import PAYMENT_RESPONSE_HEADER, PAYMENT_SIGNATURE_HEADER, SCHEME
from escrow_py.seller import SellerStore

from .independent_client import pay as independent_pay
from .world import Books, SellerProcess, buy_from_a_seller_that_dies, serving


def _until(what: str, done: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _deposits_by(chain: Chain, buyer: str) -> list[Deposited]:
    events = chain.escrow.events(0, int(chain.w3.eth.block_number))
    return [e for e in events if isinstance(e, Deposited) and e.terms.buyer == buyer]


class AgentProcess:
    """`python -m escrow_devtools.demo.agent`: a buyer agent in its own process, the buyer's key in its environment."""

    def __init__(self, chain: Chain, *args: str) -> None:
        env = {**os.environ, "X402_ESCROW_PRIVATE_KEY": dev_private_key(BUYER)}
        command = [sys.executable, "-m", "escrow_devtools.demo.agent", *args, "--rpc", chain.node.url]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def lines(self, timeout: float = 60) -> list[dict[str, Any]]:
        out, err = self.process.communicate(timeout=timeout)
        assert self.process.returncode == 0, err
        return [json.loads(line) for line in out.splitlines()]


def test_the_sellers_402_decodes_with_the_official_sdk(chain: Chain, tmp_path: Path) -> None:
    with serving(chain, tmp_path / "seller.sqlite") as url:
        response = localhttp.get(f"{url}/report/sdk?q=1")
    assert response.status_code == 402
    assert response.headers["cache-control"] == "no-store"
    required = decode_payment_required_header(response.headers["PAYMENT-REQUIRED"])
    assert isinstance(required, PaymentRequired)
    assert required.x402_version == 2
    assert PaymentRequired.model_validate(response.json()) == required  # the body carries the same JSON
    (option,) = required.accepts
    assert (option.scheme, option.network, option.asset, option.pay_to) == (
        SCHEME,
        "eip155:84532",
        chain.token.address,
        address(SELLER),
    )
    assert int(option.amount) == REPORT_PRICE
    assert required.resource is not None and required.resource.url == f"{url}/report/sdk?q=1"


def test_happy_path_pays_serves_and_releases(chain: Chain, tmp_path: Path) -> None:
    books = Books(chain)
    with serving(chain, tmp_path / "seller.sqlite") as url:
        with EscrowClient(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite") as client:
            response = client.get(f"{url}/report/happy")
            (entry,) = client.journal.entries()
        assert response.status_code == 200
        assert json.loads(response.content)["item"] == "happy"
        assert entry.state is PaymentState.DELIVERED
        books.check()
        _until("the poster's deliverMany", lambda: chain.escrow.state_of(entry.escrow_id) is State.RELEASED)
    assert delivered_hash(chain.w3, chain.escrow.address, entry.escrow_id) == delivery_hash(response.content)
    after = books.balances()
    assert after[address(SELLER)] - books.before[address(SELLER)] == REPORT_PRICE
    assert books.before[address(BUYER)] - after[address(BUYER)] == REPORT_PRICE
    books.check()


def test_handler_failure_is_refunded_at_once(chain: Chain, tmp_path: Path) -> None:
    books = Books(chain)
    with (
        serving(chain, tmp_path / "seller.sqlite") as url,
        EscrowClient(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite") as client,
        pytest.raises(HandlerFailedRefunded) as failed,
    ):
        client.get(f"{url}/fail")
    assert failed.value.status == 500 and failed.value.refund_tx is not None
    assert failed.value.escrow_id is not None
    assert chain.escrow.state_of(failed.value.escrow_id) is State.REFUNDED
    assert books.balances() == books.before  # deposited, then refunded: every balance back where it was
    books.check()


def test_replay_returns_the_same_bytes_and_never_charges_twice(chain: Chain, tmp_path: Path) -> None:
    books = Books(chain)
    with serving(chain, tmp_path / "seller.sqlite") as url:
        with EscrowClient(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite") as client:
            first = client.get(f"{url}/report/replay")
            (entry,) = client.journal.entries()
        again = [
            localhttp.get(f"{url}/report/replay", headers={PAYMENT_SIGNATURE_HEADER: entry.payment_header})
            for _ in range(3)
        ]
    assert [r.status_code for r in again] == [200, 200, 200]
    assert {r.content for r in again} == {first.content}  # byte-identical, not re-rendered
    assert all(r.headers[PAYMENT_RESPONSE_HEADER] for r in again)
    assert len(_deposits_by(chain, address(BUYER))) == 1
    assert books.before[address(BUYER)] - books.balances()[address(BUYER)] == REPORT_PRICE
    books.check()


def test_buyer_sigkilled_after_its_deposit_recovers_the_exact_bytes_in_a_new_process(
    chain: Chain, tmp_path: Path
) -> None:
    books = Books(chain)
    journal = tmp_path / "agent.sqlite"
    store = tmp_path / "seller.sqlite"
    with serving(chain, store, work_seconds=2.0) as url:
        agent = AgentProcess(chain, "pay", f"{url}/report/killed", "--journal", str(journal))
        _until("the seller's deposit", lambda: bool(_deposits_by(chain, address(BUYER))))
        agent.process.send_signal(signal.SIGKILL)
        assert agent.process.wait(10) == -signal.SIGKILL
        (deposit,) = _deposits_by(chain, address(BUYER))
        # Killed after the deposit, before any answer: the journal knows the payment, nothing more.
        (entry,) = Journal(journal).entries()
        assert (entry.escrow_id, entry.state) == (deposit.id, PaymentState.SIGNED)
        books.check()
        _until("the handler and the poster", lambda: chain.escrow.state_of(deposit.id) is State.RELEASED)
        books.check()
        lines = AgentProcess(chain, "recover", "--journal", str(journal)).lines()
    (item,) = [line for line in lines if line["event"] == "recovered"]
    assert (item["chainState"], item["action"], item["journalState"]) == ("released", "replayed", "delivered")
    body = base64.b64decode(item["body"])
    stored = SellerStore(store).payment(deposit.id)
    assert stored is not None and stored.response is not None
    assert body == stored.response.body  # the exact bytes the handler produced while the buyer was dead
    assert delivery_hash(body) == delivered_hash(chain.w3, chain.escrow.address, deposit.id)
    assert json.loads(body)["item"] == "killed"
    assert len(_deposits_by(chain, address(BUYER))) == 1
    books.check()


def test_seller_killed_after_the_handler_restarts_and_posts_the_delivery(chain: Chain, tmp_path: Path) -> None:
    books = Books(chain)
    store, journal, port = tmp_path / "seller.sqlite", tmp_path / "buyer.sqlite", free_port()
    escrow_id = buy_from_a_seller_that_dies(chain, store, journal, port)
    # Deposited, served and stored, never posted: held, and the store has the delivery queued.
    assert chain.escrow.state_of(escrow_id) is State.HELD
    queued = SellerStore(store).pending_deliveries()
    assert [q.escrow_id for q in queued] == [escrow_id]
    books.check()
    restarted = SellerProcess(chain, store, port)
    try:
        _until("the restarted seller's poster", lambda: chain.escrow.state_of(escrow_id) is State.RELEASED)
        assert delivered_hash(chain.w3, chain.escrow.address, escrow_id) == queued[0].delivery_hash
        books.check()
        report = recover(journal, dev(BUYER), chain.node.url)
    finally:
        restarted.stop()
    (item,) = report.items
    assert item.journal_state is PaymentState.DELIVERED and item.body is not None
    assert delivery_hash(item.body) == queued[0].delivery_hash
    assert json.loads(item.body)["item"] == "crash"
    assert len(_deposits_by(chain, address(BUYER))) == 1
    books.check()


def test_an_independent_client_written_from_the_design_pays_a_route(chain: Chain, tmp_path: Path) -> None:
    books = Books(chain)
    with serving(chain, tmp_path / "seller.sqlite") as url:
        paid = independent_pay(f"{url}/report/independent", dev_private_key(BUYER), 84532, chain.node.url)
        assert paid.status == 200, paid.body
        extra = paid.settlement["extra"]
        escrow_id = bytes.fromhex(extra["escrowId"][2:])
        assert bytes.fromhex(extra["deliveryHash"][2:]) == delivery_hash(paid.body)
        _until("the poster's deliverMany", lambda: chain.escrow.state_of(escrow_id) is State.RELEASED)
    assert delivered_hash(chain.w3, chain.escrow.address, escrow_id) == delivery_hash(paid.body)
    assert books.balances()[address(SELLER)] - books.before[address(SELLER)] == REPORT_PRICE
    books.check()
