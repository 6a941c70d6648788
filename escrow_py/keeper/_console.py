"""The operator console's figures from a keeper's database (served by the keeper's HTTP server at /console).

Read through a database handle of its own (one read snapshot per page), so the console never
shares the keeper loop's connection. Everything comes from the index the keeper keeps of the
chain's events and from its own refund attempts, on SQLite or PostgreSQL alike; the chain head
(for the lag) is asked of the node by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

from escrow_py.console import Figures, running_totals
from escrow_py.keeper._store import MIGRATIONS, NAMESPACE, decode_terms
from escrow_py.storage import Database, open_store

RECENT = 20
NEXT_DEADLINES = 10
ID_BYTES = 32  # an attempt's ids are its escrow ids, concatenated


def open_console_db(database: str) -> Database:
    """A small pool of its own on the keeper's store (already migrated by the keeper)."""
    return open_store(database, NAMESPACE, MIGRATIONS, component="console", pool_size=2)


def _hex(value: object) -> str:
    return "0x" + bytes(value).hex() if isinstance(value, bytes | bytearray | memoryview) else str(value)


def keeper_figures(db: Database, head: Callable[[], int]) -> Figures:
    """What the console shows for a keeper: `head` is the chain's latest block (its lag is head minus checkpoint)."""
    figures = Figures()
    figures.series_x_is_time = False
    figures.gas_unit = "gas"
    with db.read() as tx:
        for token, terms in tx.all("SELECT token, terms FROM deposits WHERE open = 1"):
            figures.held_by_token[token] = figures.held_by_token.get(token, 0) + decode_terms(bytes(terms)).amount
        held = tx.one("SELECT COUNT(*) FROM deposits WHERE open = 1")
        figures.by_state["held"] = int(held[0]) if held else 0
        for kind, n in tx.all("SELECT kind, SUM(n) FROM totals GROUP BY kind"):
            figures.by_state[str(kind)] = int(n)
        figures.next_deadlines = [
            {"escrowId": _hex(i), "deadline": int(d), "state": "held", "amount": str(decode_terms(bytes(t)).amount)}
            for i, d, t in tx.all(
                "SELECT id, deadline, terms FROM deposits WHERE open = 1 ORDER BY deadline LIMIT ?", (NEXT_DEADLINES,)
            )
        ]
        figures.recent = [
            {"tx": _hex(h), "kind": f"refund ({status})", "escrows": len(bytes(ids)) // ID_BYTES, "amount": "",
             "gasWei": str(gas or 0), "block": block, "at": created}
            for h, status, ids, gas, block, created in tx.all(
                "SELECT tx_hash, status, ids, gas_used, block_number, created_at FROM attempts "
                "ORDER BY created_at DESC LIMIT ?", (RECENT,))
        ]  # fmt: skip
        gas = tx.one("SELECT COALESCE(SUM(gas_used), 0) FROM attempts")
        figures.gas_wei_by_kind = {"refund": int(gas[0]) if gas else 0}
        checkpoint = tx.one("SELECT MIN(block_number) FROM checkpoints")
        movements = tx.all(
            "SELECT block_number, 'deposit', terms FROM deposits UNION ALL "
            "SELECT s.block_number, s.kind, d.terms FROM settlements s JOIN deposits d ON d.escrow = s.escrow "
            "AND d.id = s.id ORDER BY 1"
        )
    figures.keeper_lag = None if not checkpoint or checkpoint[0] is None else max(0, head() - int(checkpoint[0]))
    figures.series = running_totals((float(b), str(k), decode_terms(bytes(t)).amount) for b, k, t in movements)
    return figures
