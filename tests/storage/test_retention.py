"""Retention on both engines: `prune` forgets settled rows past deadline + grace, and keeps what still matters."""

from __future__ import annotations

import json
import os
import time

import pytest
from eth_utils.address import to_checksum_address

from escrow_py.buyer import Journal, PaymentState
from escrow_py.buyer._journal import PaymentRow
from escrow_py.buyer._ledger import LedgerStatus
from escrow_py.buyer._policy import PaymentContext, Policy
from escrow_py.chain.tx import SentTx
from escrow_py.cli import main
from escrow_py.keeper._store import IndexedEvent, KeeperStore
from escrow_py.protocol.terms import Terms

TOKEN, SELLER, BUYER = (to_checksum_address("0x" + c * 20) for c in ("44", "33", "22"))
NOW = 2_000_000_000
OLD, RECENT = NOW - 30 * 86_400, NOW - 3_600


def _deposit(n: int, deadline: int, block: int = 5) -> IndexedEvent:
    return IndexedEvent("deposited", "0x" + f"{n:064x}", block, "0xaa", "0xbb", encoded=b"\0" * 256, deadline=deadline,
                        buyer=BUYER, seller=SELLER, token=TOKEN)  # fmt: skip


def test_keeper_prune_forgets_settled_history_and_keeps_open_escrows_and_totals(db_url: str) -> None:
    store = KeeperStore(db_url)
    events = [_deposit(1, OLD), _deposit(2, OLD), _deposit(3, RECENT),
              IndexedEvent("refunded", "0x" + f"{1:064x}", 6, "0xcc", "0x" + "dd" * 32),
              IndexedEvent("released", "0x" + f"{3:064x}", 6, "0xcc", "0x" + "ee" * 32)]  # fmt: skip
    store.apply("0xescrow", rewind_to=0, events=events, checkpoint=6, block_hashes=[(6, "0xcc")], read_checkpoint=None)
    for n, status in ((7, "final"), (8, "sent")):
        store.record_attempt("0xescrow", "0xkeeper", [n.to_bytes(32, "big")], SentTx(bytes([n]) * 32, n, {}, b"\x02"))
        store.set_attempt_status(bytes([n]) * 32, status)
    store.db.execute("UPDATE attempts SET updated_at = ?", (OLD,))
    before = store.counts("0xescrow")
    assert before == {"held": 1, "released": 1, "refunded": 1}

    assert KeeperStore.__module__  # the store's own prune, as `x402-escrow prune` runs it
    from escrow_py.keeper._store import prune

    deleted = prune(store.db, before=NOW - 86_400)
    assert deleted["deposits"] == 1 and deleted["settlements"] == 1 and deleted["attempts"] == 1
    assert store.counts("0xescrow") == before  # running totals, not recounted
    assert [e.id for e in store.open_escrows("0xescrow")] == [(2).to_bytes(32, "big")]  # open: kept however old
    assert store.entries("0xescrow", [(3).to_bytes(32, "big")])  # settled, but within the grace
    assert [a.status for a in store.tracked_attempts(None)] == ["sent"]  # still followed up: kept
    assert prune(store.db, before=NOW - 86_400) == dict.fromkeys(deleted, 0)


def _pay(journal: Journal, n: int, deadline: int) -> bytes:
    escrow_id = os.urandom(32)
    terms = Terms(
        buyer=BUYER,
        seller=SELLER,
        operator=SELLER,
        token=TOKEN,
        amount=1_000,
        deadline=deadline,
        request_hash=b"\1" * 32,
        salt=b"\2" * 32,
    )
    ctx = PaymentContext("eip155:84532", TOKEN, "0xescrow", SELLER, "shop.test", 1_000, 60, "default")
    assert journal.reserve(escrow_id, terms, ctx, Policy(total_budget=10**9)).allowed
    journal.record(PaymentRow(escrow_id=escrow_id, chain_id=84532, escrow="0xescrow", method="GET",
                              url=f"http://shop.test/{n}", headers={}, body=b"", terms=terms, valid_before=deadline,
                              payment_header="x"))  # fmt: skip
    return escrow_id


def test_buyer_prune_keeps_unfinished_and_unconfirmed_payments_and_the_budget(db_url: str) -> None:
    journal = Journal(db_url, audit=False)
    done, unconfirmed, held, recent = (_pay(journal, n, d) for n, d in enumerate((OLD, OLD, OLD, RECENT)))
    for escrow_id in (done, unconfirmed, recent):
        journal.update(escrow_id, PaymentState.DELIVERED)
    journal.confirm_on_chain(done, spent=True)
    journal.confirm_on_chain(recent, spent=True)
    ctx = PaymentContext("eip155:84532", TOKEN, "0xescrow", SELLER, "shop.test", 1, 60, "default")
    with journal.db.read() as tx:
        from escrow_py.buyer import _ledger

        budget_before = _ledger.usage(tx, ctx, (), NOW)
    from escrow_py.buyer._journal import prune

    assert prune(journal.db, before=NOW - 86_400) == {"payments": 1, "ledger": 1}
    assert journal.get(done) is None
    assert {e.escrow_id for e in journal.entries()} == {unconfirmed, held, recent}
    assert [e.escrow_id for e in journal.entries(unfinished_only=True)] == [held]  # what recover() works on
    assert journal.unconfirmed() == [unconfirmed]
    with journal.db.read() as tx:
        assert _ledger.usage(tx, ctx, (), NOW) == budget_before  # spent money still counts against the budget
    assert {r.status for r in journal.ledger_rows()} == {LedgerStatus.SPENT, LedgerStatus.RESERVED}


def test_migrate_and_prune_commands(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    if db_url.startswith("postgresql"):
        assert main(["migrate", "--db", db_url]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        done = {(x["role"], x["store"]): x for x in lines if "version" in x}
        assert done[("keeper", "keeper")]["applied"] == [1, 2] and done[("buyer", "buyer")]["version"] == 4
        assert main(["migrate", "--db", db_url]) == 0  # again: nothing to do
        assert all(not x.get("applied") for x in map(json.loads, capsys.readouterr().out.splitlines()))
    else:
        assert main(["migrate", "--db", db_url]) == 2  # a SQLite file is one role's
        assert "say which with --role" in capsys.readouterr().err
        assert main(["migrate", "--db", db_url, "--role", "keeper"]) == 0
        assert json.loads(capsys.readouterr().out)["version"] == 2
    store = KeeperStore(db_url)
    long_ago = int(time.time()) - 30 * 86_400  # the command prunes against the wall clock
    refund = IndexedEvent("refunded", "0x" + f"{1:064x}", 6, "0xcc", "0x" + "dd" * 32)
    store.apply(
        "0xescrow",
        rewind_to=0,
        checkpoint=6,
        block_hashes=[],
        events=[_deposit(1, long_ago), refund],
        read_checkpoint=None,
    )
    store.close()
    assert main(["prune", "--db", db_url, "--role", "keeper", "--grace", "86400"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"]["deposits"] == 1
    assert main(["prune", "--db", db_url, "--role", "keeper", "--grace", "-1"]) == 2
    # The seller's store is on the port too: its schema is migrated by the same command.
    from escrow_py.storage._roles import ROLES, migrations_of

    assert migrations_of(ROLES["seller"][0], "seller")
