"""The budget windows read per-hour totals plus the rows of the window's partial first hour: the sums must be
exactly those of the committed rows in the window, at any window start (on an hour, just before one, just after),
after reservations were released, and for a journal written before the hourly totals existed (the migration's
backfill). Both engines."""

from __future__ import annotations

import random

from eth_utils.address import to_checksum_address

from escrow_py.buyer import Journal, _ledger
from escrow_py.buyer._journal import MIGRATIONS
from escrow_py.buyer._ledger import HOUR, LedgerStatus
from escrow_py.buyer._policy import PaymentContext
from escrow_py.storage import open_store

TOKEN, OTHER = (to_checksum_address("0x" + c * 20) for c in ("44", "55"))
SELLER = to_checksum_address("0x" + "33" * 20)
NOW = 2_000_000_000.0  # on no hour: the windows' starts fall inside an hour
WINDOWS = (60, 1800, HOUR, HOUR + 1, 5400, 86_400, 86_400 - 1, 7 * 86_400)


def _context(token: str, amount: int) -> PaymentContext:
    return PaymentContext("eip155:84532", token, "0xescrow", SELLER, "shop.test", amount, 60, "default")


def _reserve_history(journal: Journal, rng: random.Random) -> None:
    """400 reservations over the last 8 days in two tokens, many on or next to an hour's edge; a quarter released."""
    with journal.db.transaction() as tx:
        for n in range(400):
            hour = (int(NOW) // HOUR - rng.randrange(0, 8 * 24)) * HOUR
            at = float(rng.choice((hour, hour - 0.25, hour + 0.25, hour + rng.uniform(0, HOUR))))
            token = TOKEN if n % 5 else OTHER
            escrow_id = n.to_bytes(32, "big")
            _ledger.insert_reservation(tx, escrow_id, _context(token, 1_000 + n), at)
            if n % 4 == 1:
                _ledger.set_status(tx, escrow_id, LedgerStatus.RELEASED, NOW)
            elif n % 4 == 2:
                _ledger.set_status(tx, escrow_id, LedgerStatus.SPENT, NOW)


def _brute_force(journal: Journal, token: str, now: float, seconds: float) -> int:
    return sum(
        r.amount
        for r in journal.ledger_rows()
        if r.token == token and r.reserved_at >= now - seconds and r.status.committed
    )


def _check_windows(journal: Journal) -> None:
    for now in (NOW, NOW - 1800, float(int(NOW) // HOUR * HOUR), NOW + 0.25):
        for token in (TOKEN, OTHER):
            with journal.db.read() as tx:
                usage = _ledger.usage(tx, _context(token, 1), WINDOWS, now)
            assert usage.windows == {w: _brute_force(journal, token, now, w) for w in WINDOWS}, (now, token)


def test_window_sums_equal_the_committed_rows_in_each_window(db_url: str) -> None:
    journal = Journal(db_url, audit=False)
    try:
        _reserve_history(journal, random.Random(7))
        _check_windows(journal)
        # A release moves the hour's total back: the window no longer counts it.
        with journal.db.transaction() as tx:
            _ledger.set_status(tx, (8).to_bytes(32, "big"), LedgerStatus.RELEASED, NOW)
        _check_windows(journal)
    finally:
        journal.close()


def test_a_journal_from_before_the_hourly_totals_gets_them_from_its_rows(db_url: str) -> None:
    older = open_store(db_url, "buyer", MIGRATIONS[:3])  # the journal as schema 3 left it
    try:
        with older.transaction() as tx:
            rows = [(n.to_bytes(32, "big"), "default", SELLER, TOKEN, 500 + n, status, NOW - n * 997.5, None, 0)
                    for n, status in enumerate(["reserved", "spent", "released"] * 60)]  # fmt: skip
            tx.executemany("INSERT INTO ledger VALUES (?,?,?,?,?,?,?,?,?)", rows)
            _ledger.fill_totals(tx)
    finally:
        older.close()
    journal = Journal(db_url, audit=False)  # migrates to schema 4: the hours are backfilled
    try:
        _check_windows(journal)
    finally:
        journal.close()
