"""The facilitator's own tables on the storage port (SQLite by default, PostgreSQL for several replicas).

One database holds everything a facilitator keeps: the escrow store it shares with the seller's
code (payments, deliveries, settlements, leases, the operator key's nonces and transactions: the
`seller` migrations) and its own tables here (API keys, idempotency records, the transaction
ledger: the `facilitator` migrations). On PostgreSQL both live in the schema `facilitator`, so a
seller and a facilitator given one URL never share a `payments` table, and the console's joins of
the ledger with the escrow store stay within one schema.

The rate limit lives here too (`rate_limits`, one row per API key), so every replica on the database
counts against one limit per key (KeyStore.admit).
"""

from __future__ import annotations

from pathlib import Path

from escrow_py.storage import Database, Migration, open_store

NAMESPACE = "facilitator"  # its PostgreSQL schema, shared by the escrow store and these tables

_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, name TEXT NOT NULL,
    created_at REAL NOT NULL, revoked_at REAL
);
CREATE TABLE IF NOT EXISTS api_key_pay_to (
    key_id TEXT NOT NULL REFERENCES api_keys (key_id), pay_to TEXT NOT NULL, PRIMARY KEY (key_id, pay_to)
);
CREATE TABLE IF NOT EXISTS idempotency (
    key_id TEXT NOT NULL, idempotency_key TEXT NOT NULL, endpoint TEXT NOT NULL, body_sha256 TEXT NOT NULL,
    status INTEGER, response TEXT, started_at REAL NOT NULL,
    PRIMARY KEY (key_id, idempotency_key)
);
CREATE TABLE IF NOT EXISTS facilitator_txs (
    tx_hash TEXT PRIMARY KEY, kind TEXT NOT NULL, escrows TEXT NOT NULL, amount TEXT NOT NULL,
    gas_cost_wei TEXT NOT NULL, block INTEGER NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS facilitator_txs_at ON facilitator_txs (at)
"""

# The rate limit per API key, shared by the replicas: the key's theoretical arrival time (GCRA, the
# token bucket kept as one number), in Unix seconds of the database's clock. Idempotency records are
# pruned by age (`x402-escrow prune`, FacilitatorConfig.idempotency_retention): an index on it.
_SCHEMA_2 = """
CREATE TABLE rate_limits (key_id TEXT PRIMARY KEY, tat REAL NOT NULL);
CREATE INDEX idempotency_started_at ON idempotency (started_at)
"""

# IF NOT EXISTS: a SQLite file written before the port has these tables already, with the same columns.
MIGRATIONS = (
    Migration(1, "api keys, idempotency records, transaction ledger", _SCHEMA_1),
    Migration(2, "rate limits shared by the replicas; idempotency records by age", _SCHEMA_2),
)


def open_tables(url: str | Path, *, pool_size: int = 10) -> Database:
    """The facilitator's database at `url` with its own tables migrated (the escrow store migrates its own)."""
    return open_store(url, NAMESPACE, MIGRATIONS, component="facilitator", pool_size=pool_size)


__all__ = ["MIGRATIONS", "NAMESPACE", "open_tables"]
