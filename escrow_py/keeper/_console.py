"""The operator console's figures from a keeper's database (served by the keeper's HTTP server at /console).

Read with a connection of its own per page, so the console never shares the keeper's
connection with the loop that writes it. Everything comes from the index the keeper keeps
of the chain's events and from its own refund attempts; the chain head (for the lag) is
asked of the node by the caller.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from escrow_py.console import Figures, running_totals
from escrow_py.keeper._store import decode_terms
from escrow_py.storage import open_sqlite

RECENT = 20
NEXT_DEADLINES = 10


def keeper_figures(database: str, head: Callable[[], int]) -> Figures:
    """What the console shows for a keeper: `head` is the chain's latest block (its lag is head minus checkpoint)."""
    conn = open_sqlite(database)
    try:
        figures = Figures()
        figures.series_x_is_time = False
        figures.gas_unit = "gas"
        for token, terms in conn.execute("SELECT token, terms FROM deposits WHERE open = 1"):
            figures.held_by_token[token] = figures.held_by_token.get(token, 0) + decode_terms(bytes(terms)).amount
        (held,) = conn.execute("SELECT COUNT(*) FROM deposits WHERE open = 1").fetchone()
        figures.by_state["held"] = int(held)
        for kind, n in conn.execute("SELECT kind, SUM(n) FROM totals GROUP BY kind"):
            figures.by_state[str(kind)] = int(n)
        figures.next_deadlines = [
            {"escrowId": i, "deadline": int(d), "state": "held", "amount": str(decode_terms(bytes(t)).amount)}
            for i, d, t in conn.execute(
                "SELECT id, deadline, terms FROM deposits WHERE open = 1 ORDER BY deadline LIMIT ?", (NEXT_DEADLINES,)
            )
        ]
        figures.recent = [
            {"tx": tx, "kind": f"refund ({status})", "escrows": len(json.loads(ids)), "amount": "",
             "gasWei": str(gas or 0), "block": block, "at": created}
            for tx, status, ids, gas, block, created in conn.execute(
                "SELECT tx_hash, status, ids, gas_used, block_number, created_at FROM attempts "
                "ORDER BY created_at DESC LIMIT ?", (RECENT,))
        ]  # fmt: skip
        (gas,) = conn.execute("SELECT COALESCE(SUM(gas_used), 0) FROM attempts").fetchone()
        figures.gas_wei_by_kind = {"refund": int(gas)}
        (checkpoint,) = conn.execute("SELECT MIN(block_number) FROM checkpoints").fetchone()
        figures.keeper_lag = None if checkpoint is None else max(0, head() - int(checkpoint))
        movements = conn.execute(
            "SELECT block_number, 'deposit', terms FROM deposits UNION ALL "
            "SELECT s.block_number, s.kind, d.terms FROM settlements s JOIN deposits d ON d.escrow = s.escrow "
            "AND d.id = s.id ORDER BY 1"
        ).fetchall()
        figures.series = running_totals((float(b), k, decode_terms(bytes(t)).amount) for b, k, t in movements)
        return figures
    finally:
        conn.close()
