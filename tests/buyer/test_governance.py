"""Policy, ledger, audit trail and validators on the real buyer client against the real seller middleware."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures.chain import Chain
from helpers import BUYER, SELLER, address, dev
from x402 import x402Client
from x402.http.clients.httpx import x402_httpx_transport

from escrow_devtools.anvil import dev_private_key
from escrow_py.buyer import (
    TASK_EXTENSION,
    VALIDATOR_EXTENSION,
    AsyncEscrowClient,
    DeliveryEscrowScheme,
    HandlerFailedRefunded,
    Journal,
    LedgerStatus,
    PaymentNotDelivered,
    PaymentState,
    Policy,
    PolicyDenied,
    Reason,
    ResponseInvalid,
    arecover,
)
from escrow_py.buyer._audit import audit_paths
from escrow_py.buyer._ledger import insert_reservation
from escrow_py.buyer._policy import PaymentContext
from escrow_py.protocol.terms import State

from .shop import BASE_URL, PRICE, Faulty, LostPayment, Shop


def client(chain: Chain, journal: Path, transport: httpx.AsyncBaseTransport, **kw: Any) -> AsyncEscrowClient:
    return AsyncEscrowClient(dev(BUYER), chain.node.url, journal, transport=transport, base_url=BASE_URL, **kw)


def ledger(journal: Path) -> dict[bytes, tuple[LedgerStatus, str, int]]:
    j = Journal(journal, audit=False)
    try:
        return {r.escrow_id: (r.status, r.task, r.amount) for r in j.ledger_rows()}
    finally:
        j.close()


def audit_records(journal: Path) -> list[dict[str, Any]]:
    jsonl, _ = audit_paths(journal)
    assert jsonl is not None  # a journal file's audit has its JSONL beside it
    return [json.loads(line) for line in jsonl.read_text().splitlines()]


def test_a_denied_payment_signs_nothing_and_carries_the_reason(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    before = chain.token.balance_of(address(BUYER))

    async def run() -> None:
        async with client(chain, journal, shop.transport(), policy=Policy(max_per_request=PRICE - 1)) as buyer:
            await buyer.get("/report/1")

    with pytest.raises(PolicyDenied) as denied:
        asyncio.run(run())
    assert denied.value.code == Reason.OVER_PER_REQUEST
    assert (denied.value.limit, denied.value.wanted) == (PRICE - 1, PRICE)
    assert Journal(journal).entries() == []  # no signed payment exists
    assert ledger(journal) == {}  # nothing reserved
    assert chain.token.balance_of(address(BUYER)) == before
    (record,) = audit_records(journal)
    assert (record["event"], record["decision"], record["reason"]) == ("decision", "deny", "over_per_request")
    assert record["host"] == "shop.test" and record["amount"] == PRICE


def test_budgets_count_per_task_and_a_request_can_name_its_task(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    policy = Policy(task_budget=PRICE)

    async def run() -> list[str]:
        outcomes = []
        async with client(chain, journal, shop.transport(), policy=policy, task="alpha") as buyer:
            for path, task in (("/report/a1", None), ("/report/a2", None), ("/report/b1", "beta")):
                extensions = {} if task is None else {TASK_EXTENSION: task}
                try:
                    await buyer.get(path, extensions=extensions)
                    outcomes.append("paid")
                except PolicyDenied as exc:
                    outcomes.append(exc.code)
        return outcomes

    assert asyncio.run(run()) == ["paid", Reason.OVER_TASK_BUDGET, "paid"]
    rows = ledger(journal)
    assert sorted((task, status) for status, task, _ in rows.values()) == [
        ("alpha", LedgerStatus.SPENT),
        ("beta", LedgerStatus.SPENT),
    ]


def test_the_sdk_plugin_cannot_see_the_host_so_a_host_allowlist_denies(
    chain: Chain, shop: Shop, tmp_path: Path
) -> None:
    policy = Policy(hosts=frozenset({"shop.test"}))
    scheme = DeliveryEscrowScheme(dev(BUYER), chain.node.url, tmp_path / "buyer.sqlite", policy=policy)
    sdk = x402Client().register("eip155:84532", scheme)
    sdk.set_spend_controls(
        {
            "allowed_assets": [
                {"network": "eip155:84532", "asset": chain.token.address, "max_amount_per_payment": str(PRICE)}
            ]
        }
    )

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=x402_httpx_transport(sdk, shop.transport()), base_url=BASE_URL) as c:
            return await c.get("/report/sdk")

    with pytest.raises(Exception) as raised:  # the SDK wraps the plugin's error in its own
        asyncio.run(run())
    chain_of_errors = [raised.value, raised.value.__cause__, raised.value.__context__]
    assert any(isinstance(e, PolicyDenied) and e.code == Reason.HOST_UNKNOWN for e in chain_of_errors), repr(
        chain_of_errors
    )
    assert scheme.core.journal.entries() == []


def test_ledger_spends_on_delivery_releases_on_refund_and_void(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"

    async def run() -> None:
        async with client(chain, journal, shop.transport(), task="t") as buyer:
            await buyer.get("/report/ok")
            with pytest.raises(HandlerFailedRefunded):
                await buyer.get("/fail")
        async with client(chain, journal, Faulty(shop.transport(), drop_before=True), task="t") as buyer:
            with pytest.raises(PaymentNotDelivered):
                await buyer.get("/report/lost")

    asyncio.run(run())
    entries = {e.url.rsplit("/", 1)[-1]: e for e in Journal(journal).entries()}
    rows = ledger(journal)
    assert rows[entries["ok"].escrow_id][0] is LedgerStatus.SPENT
    assert rows[entries["fail"].escrow_id][0] is LedgerStatus.RELEASED
    assert rows[entries["lost"].escrow_id][0] is LedgerStatus.RESERVED  # in flight: still counts against budgets
    # The lost payment was never deposited; once its authorization expires recover() voids it and releases it.
    chain.mine(entries["lost"].valid_before + 1)
    asyncio.run(arecover(journal, dev(BUYER), chain.node.url, transport=shop.transport()))
    assert ledger(journal)[entries["lost"].escrow_id][0] is LedgerStatus.RELEASED
    assert Journal(journal).get(entries["lost"].escrow_id).state is PaymentState.VOID  # type: ignore[union-attr]


def test_reconcile_follows_the_chain_when_a_delivered_payment_is_refunded_after_all(
    chain: Chain, shop: Shop, tmp_path: Path
) -> None:
    """The seller served (the buyer verified the bytes) but never posted: the keeper refunds at the deadline."""
    journal = tmp_path / "buyer.sqlite"

    async def run() -> None:
        async with client(chain, journal, shop.transport()) as buyer:
            await buyer.get("/report/unposted")

    asyncio.run(run())
    (entry,) = Journal(journal).entries()
    assert ledger(journal)[entry.escrow_id][0] is LedgerStatus.SPENT
    chain.mine(entry.terms.deadline)
    chain.escrow.refund(chain.sender(SELLER), entry.terms)  # anyone may, after the deadline
    asyncio.run(arecover(journal, dev(BUYER), chain.node.url, transport=shop.transport()))
    assert ledger(journal)[entry.escrow_id][0] is LedgerStatus.RELEASED
    assert chain.escrow.state_of(entry.escrow_id) is State.REFUNDED


def test_a_reservation_that_never_got_its_journal_row_is_released_by_recover(chain: Chain, tmp_path: Path) -> None:
    journal_path = tmp_path / "buyer.sqlite"
    journal = Journal(journal_path, audit=False)
    with journal.db.transaction() as tx:  # a crash between reserve() and record(): nothing was ever sent
        ctx = PaymentContext("eip155:84532", chain.token.address, chain.escrow.address, address(SELLER), None, 5,
                             60, "default")  # fmt: skip
        insert_reservation(tx, os.urandom(32), ctx, 0.0)
    journal.close()
    asyncio.run(arecover(journal_path, dev(BUYER), chain.node.url))
    ((status, _, _),) = ledger(journal_path).values()
    assert status is LedgerStatus.RELEASED


def test_a_schema_validator_failure_says_the_money_is_spent(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"
    schema = {"type": "object", "required": ["price"], "properties": {"price": {"type": "number"}}}

    async def run() -> None:
        async with client(chain, journal, shop.transport(), validator=schema) as buyer:
            await buyer.get("/report/shape")

    with pytest.raises(ResponseInvalid, match="delivered and settled") as invalid:
        asyncio.run(run())
    assert "'price' is a required property" in invalid.value.problem
    assert json.loads(invalid.value.body)["item"] == "shape"  # kept as evidence, not handed over as a response
    (entry,) = Journal(journal).entries()
    assert entry.state is PaymentState.DELIVERED and "validation failed" in (entry.detail or "")
    assert ledger(journal)[entry.escrow_id][0] is LedgerStatus.SPENT
    assert [r["event"] for r in audit_records(journal)][-1] == "validation_failed"


def test_a_request_can_bring_its_own_callable_validator(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"

    def fresh(response: httpx.Response) -> bool:
        return bool(response.json()["call"] < 2)

    async def run() -> list[str]:
        results = []
        async with client(chain, journal, shop.transport()) as buyer:
            for _ in range(2):
                try:
                    await buyer.get("/report/fresh", extensions={VALIDATOR_EXTENSION: fresh})
                    results.append("ok")
                except ResponseInvalid as exc:
                    results.append(exc.problem)
        return results

    assert asyncio.run(run()) == ["ok", "the validator returned False"]


def test_the_audit_trail_has_a_record_per_decision_and_state_and_leaks_nothing(
    chain: Chain, shop: Shop, tmp_path: Path
) -> None:
    journal = tmp_path / "buyer.sqlite"
    secret_body = b"confidential-question-about-merger"

    async def run() -> None:
        async with client(chain, journal, shop.transport()) as buyer:
            await buyer.post("/echo?customer=alice&token=hunter2", content=secret_body)
            with pytest.raises(HandlerFailedRefunded):
                await buyer.get("/fail?session=s3cr3t")
        async with client(chain, journal, shop.transport(), policy=Policy(max_per_request=1)) as buyer:
            with pytest.raises(PolicyDenied):
                await buyer.get("/report/denied?q=private-query")

    asyncio.run(run())
    entries = Journal(journal).entries()
    jsonl, sqlite_file = audit_paths(journal)
    records = audit_records(journal)
    with sqlite3.connect(sqlite_file) as conn:
        rows = [json.loads(r[0]) for r in conn.execute("SELECT record FROM audit ORDER BY seq")]
    assert rows == records  # the same trail in both forms
    events = [(r["event"], r.get("decision") or r.get("state")) for r in records]
    assert events == [
        ("decision", "allow"),
        ("state", "signed"),
        ("state", "delivered"),
        ("decision", "allow"),
        ("state", "signed"),
        ("state", "refunded"),
        ("decision", "deny"),
    ]
    assert all(r["termsHash"].startswith("0x") and r["amount"] == PRICE for r in records)
    assert any("txHash" in r for r in records if r.get("state") == "refunded")
    # Search everything written for what must never be there.
    assert jsonl is not None
    written = jsonl.read_text() + Path(sqlite_file).read_bytes().decode("latin-1")
    key = dev_private_key(BUYER).removeprefix("0x")
    forbidden = [key, "hunter2", "alice", "s3cr3t", "private-query", secret_body.decode(), "/echo", "/report"]
    for entry in entries:
        signature = json.loads(base64.b64decode(entry.payment_header))["payload"]["signature"]
        forbidden += [signature.removeprefix("0x"), entry.payment_header]
    for needle in forbidden:
        assert needle.lower() not in written.lower(), f"{needle!r} leaked into the audit trail"


def test_buyer_report_prints_spend_reservations_and_open_payments(chain: Chain, shop: Shop, tmp_path: Path) -> None:
    journal = tmp_path / "buyer.sqlite"

    async def run() -> None:
        async with client(chain, journal, shop.transport(), task="research") as buyer:
            await buyer.get("/report/r1")
            await buyer.get("/report/r2", extensions={TASK_EXTENSION: "ops"})
        async with client(chain, journal, Faulty(shop.transport(), drop_after=True), task="ops") as buyer:
            with pytest.raises(PaymentNotDelivered) as lost:
                await buyer.get("/report/r3")
            assert isinstance(lost.value.__cause__, LostPayment)

    asyncio.run(run())
    command = [sys.executable, "-m", "escrow_py.cli", "buyer", "report", "--journal", str(journal)]
    data = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, check=True).stdout)
    by_task = {row["name"]: row for row in data["by_task"]}
    assert (by_task["research"]["spent"], by_task["ops"]["spent"], by_task["ops"]["reserved"]) == (PRICE, PRICE, PRICE)
    (seller,) = data["by_seller"]
    assert (seller["name"], seller["spent"], seller["reserved"]) == (address(SELLER), 2 * PRICE, PRICE)
    (reservation,) = data["reservations"]
    (open_payment,) = data["open"]
    assert reservation["escrowId"] == open_payment["escrowId"] and open_payment["state"] == "signed"
    table = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "spend by task" in table and "reservations (1)" in table and "open payments (1)" in table
    missing = subprocess.run(
        [*command[:-1], str(tmp_path / "none.sqlite")], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2 and "no journal at" in missing.stderr
