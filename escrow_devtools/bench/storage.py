"""`x402-escrow bench storage`: every per-request and per-cycle query of the stores at 100,000 payments.

A synthetic fill (written straight into the tables, as years of traffic would have left them) of
`rows` payments per store, then each query a loop runs is timed `repeat` times on each engine:

- keeper, per cycle: the due query (with claims), the held count, its tracked attempts, the
  checkpoint and a stored block hash; per batch: claiming 100 due escrows;
- buyer, per paid request: the budget check (the reservation's transaction: lock, usage over the
  totals and a 1-hour and a 1-day window) and reading a payment; per recovery: unfinished payments
  and unconfirmed ledger rows;
- seller, per paid request: reading a payment, its claim taken (released with the stored answer), a nonce
  allocated and the transactions of an intent looked up (each transaction), a buyer's serve-first exposure;
  per heartbeat: the 20 claims a replica holds renewed; per poster pass: its lease, refunds pending,
  expiring and reading pending deliveries, posted and settled ones not yet final, the unpaid serve-first
  total and the settlements due.

Target: every query's p50 under 5 ms on both engines. PostgreSQL is a throwaway local server
(escrow_devtools.bench.postgres) unless `pg_url` names one.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from escrow_py.buyer import _ledger
from escrow_py.buyer._journal import Journal
from escrow_py.buyer._policy import PaymentContext
from escrow_py.keeper._store import KeeperStore
from escrow_py.seller._store import SellerStore
from escrow_py.storage import Database

TARGET_MS = 5.0
ESCROW = "0x" + "e5" * 20
TOKEN, SELLER, KEEPER = "0x" + "44" * 20, "0x" + "33" * 20, "0x" + "77" * 20
DAY = 86_400


def _timed(run: Callable[[], object], repeat: int) -> dict[str, float]:
    run()  # warm: plans cached, pages in memory
    samples = []
    cpu_before = _cpu_now()
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000)
    cpu = _cpu_since(cpu_before) * 1000 / repeat
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p95_ms": round(samples[int(len(samples) * 0.95) - 1], 3),
        "max_ms": round(samples[-1], 3),
        "cpu_ms": round(cpu, 3),
    }


# CPU seconds used so far by this process (SQLite runs in it) and by the throwaway PostgreSQL server's processes:
# a query's cost in CPU, which other processes on a busy machine do not inflate as they do its wall-clock time.
_server_cpu: Callable[[], dict[int, float]] = dict  # replaced while a throwaway server runs


def _cpu_now() -> tuple[float, dict[int, float]]:
    return time.process_time(), _server_cpu()


def _cpu_since(before: tuple[float, dict[int, float]]) -> float:
    """CPU seconds used since `before`: this process's, plus each server backend's own increase (a backend that
    exited in between is left out, so the figure can only be low, never negative)."""
    own, backends = before
    server = sum(max(0.0, used - backends.get(pid, 0.0)) for pid, used in _server_cpu().items())
    return time.process_time() - own + server


def _fill_keeper(db: Database, url: str, rows: int, now: int) -> None:
    """`rows` deposits over 90 days: 1% still open (a tenth of those due), the rest settled; 1 attempt per 100."""
    terms = bytes(256)
    deposits, settlements, attempts = [], [], []
    for n in range(rows):
        escrow_id = n.to_bytes(32, "big")
        open_ = n % 100 == 0
        deadline = now - 60 if open_ and n % 1000 == 0 else now + 3600 if open_ else now - (n * 90 * DAY) // rows
        buyer = "0x" + f"{n % 5000:040x}"
        deposits.append((ESCROW, escrow_id, terms, deadline, buyer, SELLER, TOKEN, n // 10, "0xaa", int(open_)))
        if not open_:
            settlements.append(
                (ESCROW, escrow_id, "released" if n % 3 else "refunded", os.urandom(32), n // 10 + 1, "0xbb")
            )
        if n % 100 == 1:
            ids = b"".join(i.to_bytes(32, "big") for i in range(n, min(n + 100, rows)))
            attempts.append(
                (
                    os.urandom(32),
                    KEEPER,
                    ESCROW,
                    ids,
                    n // 100,
                    b"\x02",
                    "{}",
                    "final",
                    now - 1.0 * n,
                    now - 1.0 * n,
                    n // 10,
                    "0xcc",
                    100,
                    2_000_000,
                )
            )
    with db.transaction() as tx:
        tx.executemany(
            "INSERT INTO deposits (escrow, id, terms, deadline, buyer, seller, token, block_number, "
            "block_hash, open) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            deposits,
        )
        tx.executemany("INSERT INTO settlements VALUES (?, ?, ?, ?, ?, ?)", settlements)
        tx.executemany("INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", attempts)
        for kind in ("released", "refunded"):
            n = sum(1 for s in settlements if s[2] == kind)
            tx.execute("INSERT INTO totals VALUES (?, ?, ?)", (ESCROW, kind, n))
        tx.execute("INSERT INTO checkpoints VALUES (?, ?)", (ESCROW, rows // 10 + 1))
        tx.executemany(
            "INSERT INTO blocks VALUES (?, ?)", [(b, "0xaa") for b in range(rows // 10 - 999, rows // 10 + 2)]
        )
    _analyze(db, url)


def _fill_buyer(db: Database, url: str, rows: int, now: int) -> None:
    """`rows` payments over 30 days, delivered and confirmed, of 20 tasks and 50 sellers; the last 10 unfinished."""
    payments, ledger = [], []
    terms = json.dumps(
        {
            "buyer": "0x" + "22" * 20,
            "seller": SELLER,
            "operator": SELLER,
            "token": TOKEN,
            "amount": "1000",
            "deadline": now,
            "requestHash": "0x" + "01" * 32,
            "salt": "0x" + "02" * 32,
        }
    )
    for n in range(rows):
        escrow_id = os.urandom(32)
        at = now - (rows - n) * 30 * DAY / rows
        done = n < rows - 10
        seller = "0x" + f"{n % 50:040x}"
        payments.append(
            (
                escrow_id,
                84532,
                ESCROW,
                "GET",
                f"https://api.example/report/{n}",
                "{}",
                b"",
                terms,
                int(at) + 300,
                "x" * 600,
                "delivered" if done else "held",
                None,
                os.urandom(32),
                os.urandom(32),
                None,
                at,
                at,
                int(at) + 300,
            )
        )
        ledger.append(
            (escrow_id, f"task{n % 20}", seller, TOKEN, 1_000, "spent" if done else "reserved", at, at, int(done))
        )
    with db.transaction() as tx:
        tx.executemany(
            "INSERT INTO payments (escrow_id, chain_id, escrow, method, url, headers, body, terms, "
            "valid_before, payment_header, state, detail, response_hash, committed_hash, tx_hash, "
            "created_at, updated_at, deadline) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            payments,
        )
        tx.executemany("INSERT INTO ledger VALUES (?,?,?,?,?,?,?,?,?)", ledger)
        _ledger.fill_totals(tx)
        _ledger.fill_hours(tx)
    _analyze(db, url)


def _analyze(db: Database, url: str) -> None:
    """Fresh statistics, and on PostgreSQL a vacuumed visibility map (index-only scans), as autovacuum would leave
    them after real traffic; VACUUM runs outside a transaction, so on a connection of its own (the whole database)."""
    if db.engine == "postgresql":
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
        return
    with db.transaction() as tx:
        tx.execute("ANALYZE")


def _keeper_queries(url: str, rows: int, repeat: int) -> dict[str, Any]:
    store = KeeperStore(url)
    try:
        now = int(time.time())
        _fill_keeper(store.db, url, rows, now)
        due = store.due(ESCROW, now, set(), claimable_by=KEEPER, now=now)
        batch = [e.id for e in due][:100]
        results = {
            "due (per cycle)": _timed(lambda: store.due(ESCROW, now, set(), claimable_by=KEEPER, now=now), repeat),
            "held count (per cycle with changes)": _timed(lambda: store.counts(ESCROW), repeat),
            "tracked attempts (per cycle)": _timed(lambda: store.tracked_attempts(KEEPER), repeat),
            "checkpoint (per cycle)": _timed(lambda: store.checkpoint(ESCROW), repeat),
            "block hash (per cycle)": _timed(lambda: store.block_hash(rows // 10), repeat),
            "claim 100 (per batch)": _timed(lambda: store.claim(ESCROW, KEEPER, batch, now), repeat),
        }
        return {"due_rows": len(due), "queries": results}
    finally:
        store.close()


def _buyer_queries(url: str, rows: int, repeat: int) -> dict[str, Any]:
    journal = Journal(url, audit=False)
    try:
        now = int(time.time())
        _fill_buyer(journal.db, url, rows, now)
        ctx = PaymentContext("eip155:84532", TOKEN, ESCROW, "0x" + f"{7:040x}", "api.example", 1_000, 300, "task7")
        some = journal.db.one("SELECT escrow_id FROM payments WHERE state = 'delivered' LIMIT 1")
        escrow_id = bytes(some[0]) if some else b""

        def budget_check() -> None:
            with journal.db.transaction() as tx:
                _ledger.lock_budget(tx, ctx.token)
                _ledger.usage(tx, ctx, (3600, DAY), now)

        results = {
            "budget check (per paid request)": _timed(budget_check, repeat),
            "payment by id (per paid request)": _timed(lambda: journal.get(escrow_id), repeat),
            "unfinished payments (per recovery)": _timed(lambda: journal.entries(unfinished_only=True), repeat),
            "unconfirmed ledger rows (per recovery)": _timed(journal.unconfirmed, repeat),
        }
        return {"queries": results}
    finally:
        journal.close()


def _fill_seller(db: Database, url: str, rows: int, now: int) -> None:
    """`rows` payments over 90 days: delivered and final, 2% served first and settled; the last 100 in flight (a
    poster batch of deliveries pending, as many posted and not yet final, a settlement queued); 1 refund pending per
    10,000; one deposit transaction each."""
    terms = json.dumps(
        {"buyer": "0x" + "22" * 20, "seller": SELLER, "operator": SELLER, "token": TOKEN, "amount": "1000",
         "deadline": now, "requestHash": "0x" + "01" * 32, "salt": "0x" + "02" * 32}
    )  # fmt: skip
    payments, deliveries, settlements, txs = [], [], [], []
    recent = rows - 100
    for n in range(rows):
        escrow_id, at = n.to_bytes(32, "big"), now - (rows - n) * 90 * DAY / rows
        deadline = int(at) + (3600 if n >= recent else 300)
        first = n % 50 == 2
        refund = n % 10_000 == 7
        status = "served_first" if first else "refund_pending" if refund else "served"
        payments.append((escrow_id, terms, deadline, status, int(at), os.urandom(32), None, 200, "[]", b"x" * 300,
                         at, at, "GET /report/{item}", None))  # fmt: skip
        if first:
            queued = n >= recent
            settlements.append((escrow_id, "0x" + f"{n % 5000:040x}", 1000, "{}", os.urandom(32), deadline,
                                "queued" if queued else "settled", None if queued else os.urandom(32),
                                int(not queued), at, at))  # fmt: skip
        elif not refund:
            state = ("pending", "posted")[n % 2] if n >= recent else "posted"
            deliveries.append((escrow_id, terms, os.urandom(32), deadline, state,
                               None if state == "pending" else os.urandom(32), int(n < recent), at))  # fmt: skip
        txs.append((os.urandom(32), SELLER, n, "0x" + os.urandom(32).hex(), os.urandom(180), at))
    with db.transaction() as tx:
        tx.executemany(
            "INSERT INTO payments (escrow_id, terms, deadline, status, accepted_at, deposit_tx, refund_tx, "
            "response_status, response_headers, response_body, created_at, updated_at, route, payload) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            payments,
        )
        tx.executemany(
            "INSERT INTO deliveries (escrow_id, terms, delivery_hash, deadline, status, tx_hash, final, updated_at) "
            "VALUES (?,?,?,?,?,?,?,?)",
            deliveries,
        )
        tx.executemany(
            "INSERT INTO settlements (escrow_id, buyer, amount, payload, delivery_hash, due, status, tx_hash, final, "
            "updated_at, queued_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            settlements,
        )
        tx.executemany(
            "INSERT INTO operator_txs (tx_hash, address, nonce, intent, raw, created_at) VALUES (?,?,?,?,?,?)", txs
        )
        tx.execute("INSERT INTO operator_nonces (address, next_nonce, updated_at) VALUES (?, ?, ?)",
                   (SELLER, rows, now))  # fmt: skip
    _analyze(db, url)


def _seller_queries(url: str, rows: int, repeat: int) -> dict[str, Any]:
    store = SellerStore(url)
    try:
        now = int(time.time())
        _fill_seller(store._db, url, rows, now)
        some = (rows // 2).to_bytes(32, "big")
        intent = store._db.one("SELECT intent FROM operator_txs LIMIT 1")
        fresh = (f"payment:0x{(rows + n).to_bytes(32, 'big').hex()}" for n in itertools.count())
        # A replica's heartbeat renews every claim it holds in one statement: 20 requests in flight.
        held = [(f"payment:0x{n.to_bytes(32, 'big').hex()}", f"bench:{n}") for n in range(20)]
        for name, owner in held:
            store.take_lease(name, owner, 30.0)

        def claimed() -> None:
            # A new payment's claim each run; it is released in the transaction that stores the answer (save_served),
            # so taking it is what the claim adds to a request.
            store.take_lease(next(fresh), "bench", 30.0)

        results = {
            "payment by id (per paid request)": _timed(lambda: store.payment(some), repeat),
            "claim taken (per paid request)": _timed(claimed, repeat),
            "20 claims renewed (per heartbeat, a third of a lease)": _timed(
                lambda: store.renew_leases(held, 30.0), repeat
            ),
            "nonce allocated (per transaction)": _timed(lambda: store.allocate_nonce(SELLER, 0), repeat),
            "transactions of an intent (per transaction)": _timed(
                lambda: store.txs_for(SELLER, str(intent[0] if intent else "")), repeat
            ),
            "buyer's serve-first exposure (per serve-first request)": _timed(
                lambda: store.exposure("0x" + f"{7:040x}"), repeat
            ),
            "poster lease (per pass)": _timed(lambda: store.take_lease("poster:bench", "bench", 5.0), repeat),
            "refunds pending (per pass)": _timed(store.refunds_pending, repeat),
            "expire pending (per pass)": _timed(lambda: store.expire_pending(now - 7 * DAY), repeat),
            "pending deliveries (per pass)": _timed(store.pending_deliveries, repeat),
            "posted, not final (per pass)": _timed(store.posted_unsettled, repeat),
            "unpaid serve-first total (per pass)": _timed(store.exposure, repeat),
            "settlements due (per pass)": _timed(store.settlements_due, repeat),
            "settled, not final (per pass)": _timed(store.settled_unfinal, repeat),
        }
        return {"queries": results}
    finally:
        store.close()


def measure_storage(
    *,
    rows: int = 100_000,
    repeat: int = 200,
    engines: tuple[str, ...] = ("sqlite", "postgresql"),
    pg_url: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    from escrow_devtools.bench.postgres import PostgresServer

    result: dict[str, Any] = {"rows": rows, "repeat": repeat, "target_p50_ms": TARGET_MS, "engines": {}}
    with tempfile.TemporaryDirectory(prefix="x402-bench-storage-") as tmp:
        server = PostgresServer(durable=True) if "postgresql" in engines and pg_url is None else None
        global _server_cpu  # noqa: PLW0603 - the one server this measurement runs
        try:
            for engine in engines:
                figures: dict[str, Any] = {}
                # An external server's CPU is not ours to read: then the CPU column is this process's alone.
                _server_cpu = server.backend_cpu if engine == "postgresql" and server is not None else dict
                for role, run in (("keeper", _keeper_queries), ("buyer", _buyer_queries), ("seller", _seller_queries)):
                    if engine == "sqlite":
                        url = f"sqlite:///{Path(tmp) / f'{role}.sqlite'}"
                    else:
                        url = server.fresh(f"bench_{role}") if server is not None else str(pg_url)
                    progress(f"{engine}: filling the {role} store with {rows:,} payments and timing its queries")
                    figures[role] = run(url, rows, repeat)
                result["engines"][engine] = figures
        finally:
            _server_cpu = dict
            if server is not None:
                server.stop()
    slow = [
        f"{engine} {role}: {name} p50 {q['p50_ms']} ms"
        for engine, roles in result["engines"].items()
        for role, figures in roles.items()
        for name, q in figures.get("queries", {}).items()
        if q["p50_ms"] >= TARGET_MS
    ]
    result["met"] = not slow
    result["over_target"] = slow
    return result
