"""The facilitator's transaction ledger and the figures the operator console shows.

Each transaction the facilitator sends is recorded once its receipt is in: its kind
(deposit, deliver, refund, settle), the escrows it moved, their value, and the gas it cost. The
console's figures are read from this ledger and from the escrow store (seller._store's
tables), both in the one database, so every replica shows the same numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from web3.types import TxReceipt

from escrow_py.console import Figures, running_totals
from escrow_py.facilitator._tables import open_tables
from escrow_py.seller._store import DeliveryStatus, PaymentStatus, SettleStatus
from escrow_py.storage import Database

# Where an escrow is, read from the store: the payment row and its delivery row.
_STATE_OF_ROW = f"""
CASE
  WHEN p.status = '{PaymentStatus.DEPOSITING}' THEN 'depositing'
  WHEN p.status = '{PaymentStatus.REFUNDED}' THEN 'refunded'
  WHEN p.status = '{PaymentStatus.REFUND_PENDING}' THEN 'refund pending'
  WHEN p.status = '{PaymentStatus.HELD}' THEN 'held'
  WHEN d.status = '{DeliveryStatus.PENDING}' THEN 'delivery queued'
  WHEN d.status IN ('{DeliveryStatus.POSTED}', '{DeliveryStatus.SETTLED_ELSEWHERE}') THEN 'released'
  WHEN d.status = '{DeliveryStatus.REFUNDED_ON_CHAIN}' THEN 'refunded'
  WHEN d.status = '{DeliveryStatus.EXPIRED}' THEN 'expired (refundable)'
  ELSE p.status
END
"""
_HELD_STATES = ("held", "refund pending", "delivery queued", "expired (refundable)")
RECENT = 20
NEXT_DEADLINES = 10


class Ledger:
    """The transaction ledger and the console's figures, on the facilitator's database (see _tables)."""

    def __init__(self, url: str | Path, *, pool_size: int = 5) -> None:
        self._db: Database = open_tables(url, pool_size=pool_size)

    def close(self) -> None:
        self._db.close()

    def record_tx(self, kind: str, tx_hash: bytes, receipt: TxReceipt, escrows: list[bytes], amount: int) -> None:
        gas = int(receipt["gasUsed"]) * int(receipt.get("effectiveGasPrice", 0))
        with self._db.transaction() as tx:
            tx.execute(
                "INSERT INTO facilitator_txs (tx_hash, kind, escrows, amount, gas_cost_wei, block, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tx_hash) DO NOTHING",
                (
                    "0x" + tx_hash.hex(),
                    kind,
                    json.dumps(["0x" + e.hex() for e in escrows]),
                    str(amount),
                    str(gas),
                    int(receipt["blockNumber"]),
                    time.time(),
                ),
            )

    def amount_of(self, escrows: list[bytes]) -> int:
        """The summed value of these escrows, from their recorded terms."""
        total = 0
        with self._db.read() as tx:
            for escrow_id in escrows:
                row = tx.one("SELECT terms FROM payments WHERE escrow_id = ?", (bytes(escrow_id),))
                if row is not None:
                    total += int(json.loads(row[0])["amount"])
        return total

    def queue_depths(self) -> dict[str, int]:
        """Deliveries by status and refunds pending: what the poster still has to send."""
        with self._db.read() as tx:
            rows = tx.all(
                "SELECT status, COUNT(*) FROM deliveries WHERE status = ? GROUP BY status", (DeliveryStatus.PENDING,)
            )
            refunds = tx.one("SELECT COUNT(*) FROM payments WHERE status = ?", (PaymentStatus.REFUND_PENDING,))
        depths = {str(s): int(n) for s, n in rows}
        depths[PaymentStatus.REFUND_PENDING] = 0 if refunds is None else int(refunds[0])
        return depths

    def figures(self) -> Figures:
        figures = Figures()
        with self._db.read() as tx:
            rows = tx.all(
                f"SELECT p.escrow_id, p.terms, p.deadline, {_STATE_OF_ROW} FROM payments p "  # noqa: S608 - constants
                "LEFT JOIN deliveries d ON d.escrow_id = p.escrow_id"
            )
            txs = tx.all(
                "SELECT tx_hash, kind, escrows, amount, gas_cost_wei, block, at FROM facilitator_txs ORDER BY at"
            )
            lost = tx.one("SELECT COALESCE(SUM(amount), 0) FROM settlements WHERE status = ?", (SettleStatus.LOST,))
        figures.serve_first_losses = 0 if lost is None else int(lost[0])
        held: list[tuple[int, str, str, int]] = []
        for escrow_id, terms_json, deadline, state in rows:
            figures.by_state[state] = figures.by_state.get(state, 0) + 1
            if state in _HELD_STATES:
                terms = json.loads(terms_json)
                amount = int(terms["amount"])
                token = str(terms["token"])
                figures.held_by_token[token] = figures.held_by_token.get(token, 0) + amount
                held.append((int(deadline), "0x" + bytes(escrow_id).hex(), state, amount))
        figures.next_deadlines = [
            {"escrowId": i, "deadline": d, "state": s, "amount": str(a)} for d, i, s, a in sorted(held)[:NEXT_DEADLINES]
        ]
        for _tx, kind, _escrows, _amount, gas, _block, _at in txs:
            figures.gas_wei_by_kind[kind] = figures.gas_wei_by_kind.get(kind, 0) + int(gas)
        moves = {"deposit": "deposit", "deliver": "released", "refund": "refunded", "settle": "settled"}
        figures.series = running_totals((float(at), moves[kind], int(amount)) for _, kind, _, amount, _, _, at in txs)
        figures.recent = [
            {
                "tx": tx_hash,
                "kind": kind,
                "escrows": len(json.loads(escrows)),
                "amount": amount,
                "gasWei": gas,
                "block": block,
                "at": at,
            }
            for tx_hash, kind, escrows, amount, gas, block, at in reversed(txs[-RECENT:])
        ]
        return figures
