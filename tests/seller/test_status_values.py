"""The seller store's statuses are StrEnums (PaymentStatus, DeliveryStatus, SettleStatus, Reserve), and the values
the database holds are the same bytes as when they were plain strings: a store written before reads back as the
enums, and what the store writes now is what an older version wrote. On both engines.

And the type checker now refuses a misspelled status where the store takes one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mypy import api

from escrow_py.seller import SellerStore, StoredResponse
from escrow_py.seller._store import NAMESPACE, DeliveryStatus, PaymentStatus, Reserve, SettleStatus
from escrow_py.storage import open_database

from .test_store_migration import _terms

LIMITS = {"max_per_buyer": 10**9, "max_total": 10**9}
RESPONSE = StoredResponse(200, [(b"content-type", b"text/plain")], b"ok")


def _statuses(url: str) -> dict[str, list[tuple[bytes, str]]]:
    """Every stored status, read with plain SQL (no enum in sight): table -> [(escrow id, status)]."""
    db = open_database(url, NAMESPACE)
    try:
        return {
            table: sorted((bytes(i), s) for i, s in db.all(f"SELECT escrow_id, status FROM {table}"))
            for table in ("payments", "deliveries", "settlements")
        }
    finally:
        db.close()


def test_what_the_store_writes_is_the_plain_text_it_wrote_before(db_url: str) -> None:
    store = SellerStore(db_url)
    deadline = int(time.time()) + 600
    served, refunded, first, declined = (bytes([n]) * 32 for n in (1, 2, 3, 4))
    try:
        assert store.begin_deposit(served, _terms(deadline, 1), 1)
        assert store.save_served(served, _terms(deadline, 1), RESPONSE, b"\x0a" * 32)
        assert store.begin_deposit(refunded, _terms(deadline, 2), 1)
        assert store.save_failed(refunded, RESPONSE, None)
        for escrow_id, salt in ((first, 3), (declined, 4)):
            reserved = store.begin_serve_first(escrow_id, _terms(deadline, salt), accepted_at=1, route=None,
                                               payload="{}", due=deadline, **LIMITS)  # fmt: skip
            assert reserved is None
        assert store.save_served_first(first, RESPONSE, b"\x0b" * 32)
        assert store.decline_serve_first(declined, "out_of_stock")
        known = store.begin_serve_first(first, _terms(deadline, 3), accepted_at=1, route=None, payload="{}",
                                        due=deadline, **LIMITS)  # fmt: skip
        assert known is Reserve.KNOWN
    finally:
        store.close()
    assert _statuses(db_url) == {
        "payments": [(served, "served"), (refunded, "refund_pending"), (first, "served_first"), (declined, "declined")],
        "deliveries": [(served, "pending")],
        "settlements": [(first, "queued"), (declined, "declined")],
    }


def test_rows_an_older_version_wrote_read_back_as_the_enums(db_url: str) -> None:
    """Rows written with literal status text (as the store wrote them when statuses were strings)."""
    store = SellerStore(db_url)  # creates the schema
    store.close()
    deadline, now = int(time.time()) + 600, time.time()
    held, posted, lost = (bytes([n]) * 32 for n in (5, 6, 7))
    db = open_database(db_url, NAMESPACE)
    try:
        with db.transaction() as tx:
            for escrow_id, salt, status in ((held, 5, "held"), (posted, 6, "served"), (lost, 7, "served_first")):
                tx.execute(
                    "INSERT INTO payments (escrow_id, terms, deadline, status, accepted_at, created_at, updated_at, "
                    "response_status, response_headers, response_body) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
                    (escrow_id, json.dumps(_terms(deadline, salt).to_json()), deadline, status, now, now,
                     *((None, None, None) if status == "held" else (200, "[]", b"ok"))),
                )  # fmt: skip
            tx.execute(
                "INSERT INTO deliveries (escrow_id, terms, delivery_hash, deadline, status, tx_hash, updated_at) "
                "VALUES (?, ?, ?, ?, 'posted', ?, ?)",
                (posted, json.dumps(_terms(deadline, 6).to_json()), b"\x0c" * 32, deadline, b"\x0d" * 32, now),
            )
            tx.execute(
                "INSERT INTO settlements (escrow_id, buyer, amount, payload, delivery_hash, due, status, reason, "
                "updated_at) VALUES (?, 'b', 5, '{}', ?, ?, 'lost', 'expired', ?)",
                (lost, b"\x0e" * 32, deadline, now),
            )
    finally:
        db.close()
    store = SellerStore(db_url)
    try:
        rows = {i: store.payment(i) for i in (held, posted, lost)}
        assert {i: r.status if r else None for i, r in rows.items()} == {
            held: PaymentStatus.HELD, posted: PaymentStatus.SERVED, lost: PaymentStatus.SERVED_FIRST,
        }  # fmt: skip
        assert all(type(r.status) is PaymentStatus for r in rows.values() if r is not None)
        delivery, settlement = store.delivery(posted), store.settlement(lost)
        assert delivery is not None and delivery.status is DeliveryStatus.POSTED
        assert settlement is not None and settlement.status is SettleStatus.LOST
        assert store.losses().count == 1  # queried by the enum, found by the text
        assert [p.escrow_id for p in store.posted_unsettled()] == [posted]
    finally:
        store.close()


def test_the_type_checker_refuses_a_misspelled_status(tmp_path: Path) -> None:
    snippet = tmp_path / "uses_the_store.py"
    snippet.write_text(
        "from escrow_py.seller._store import DeliveryStatus, SellerStore\n"
        "\n"
        "\n"
        "def post(store: SellerStore) -> None:\n"
        "    store.mark_deliveries([b''], DeliveryStatus.POSTED)\n"  # line 5: fine
        "    store.mark_deliveries([b''], 'postd')\n"  # line 6: a misspelled literal
        "    store.mark_deliveries([b''], DeliveryStatus.POSTD)\n"  # line 7: a misspelled member
    )
    store_module = Path(__file__).parents[2] / "escrow_py" / "seller" / "_store.py"
    # Only the store's module is read (its own imports are skipped): enough to type the calls, and quick.
    report, _, _ = api.run(["--strict", "--follow-imports=skip", "--no-incremental", "--cache-dir=/dev/null",
                            "--show-error-codes", str(snippet), str(store_module)])  # fmt: skip
    lines = {int(line.split(":")[1]) for line in report.splitlines() if line.startswith(str(snippet))}
    assert lines == {6, 7}, report
