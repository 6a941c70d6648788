"""Sellers' API keys and the idempotency record, in the facilitator's database.

A key is shown once, when created: `x4f_<key id>_<secret>`. Only the SHA-256 of the
secret is kept (the secret is 32 random bytes, so a plain hash cannot be reversed by
guessing); a lookup compares digests in constant time. Each key owns a set of
`payTo` addresses: the escrows it may act on are those whose seller is one of them.

Every request that changes state carries an idempotency key. The first request under a
key records the SHA-256 of its body and, once answered, the answer; the same key with the
same body gets that answer again without acting, the same key with another body is
refused (422). A request still in flight under the key answers 409; a row left behind by
a replica that died mid-request is taken over after `STALE_AFTER` seconds (the actions
behind it are themselves idempotent by escrow id, so running one again is safe).

The rate limit per key is kept here too, so replicas on one database share it: a generic cell
rate algorithm (a token bucket stored as one number, the key's "theoretical arrival time"),
advanced in one upsert on the database's clock, which every replica reads alike.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from escrow_py.facilitator._tables import open_tables
from escrow_py.protocol.codec import setting_address
from escrow_py.protocol.errors import ConfigError, EscrowError
from escrow_py.storage import Database, Engine

KEY_PREFIX = "x4f"
# An idempotency row with no answer after this long belongs to a request that died with its replica.
STALE_AFTER = 15.0
MAX_IDEMPOTENCY_KEY = 200

# The database's clock in Unix seconds, and the larger of two numbers, as each engine spells them. The
# clock is the database's so that replicas whose clocks differ still agree on every key's bucket.
_NOW: dict[Engine, str] = {
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
    "postgresql": "CAST(EXTRACT(EPOCH FROM now()) AS DOUBLE PRECISION)",
}
_GREATEST: dict[Engine, str] = {"sqlite": "MAX", "postgresql": "GREATEST"}


def _take_sql(engine: Engine) -> str:
    """One request against a key's bucket: the arrival time advances by one interval (`?` 1, 2, 3) unless that
    puts it more than the burst's tolerance (`?` 4) ahead of now; the new time comes back only if it did."""
    now, greatest = _NOW[engine], _GREATEST[engine]
    advanced = f"{greatest}(rate_limits.tat, {now}) + ?"
    return (
        f"INSERT INTO rate_limits (key_id, tat) VALUES (?, {now} + ?) "  # noqa: S608 - constants
        f"ON CONFLICT (key_id) DO UPDATE SET tat = {advanced} WHERE {advanced} - {now} <= ? RETURNING tat"
    )


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_id: str
    name: str
    pay_to: frozenset[str]
    revoked: bool


@dataclass(frozen=True, slots=True)
class Recorded:
    """The answer given earlier under an idempotency key."""

    status: int
    body: dict[str, object]


class IdempotencyConflict(EscrowError):
    """The key was used with another body (422), or its first request is still running (409)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class KeyStore:
    """API keys and idempotency rows on the storage port (a path, sqlite:/// or postgresql:// URL).

    Thread-safe, durable when a method returns, and safe for several replicas on one database:
    each write two replicas could race is one statement or a transaction holding the row.
    """

    def __init__(self, url: str | Path, *, pool_size: int = 5) -> None:
        self._db: Database = open_tables(url, pool_size=pool_size)
        self._take = _take_sql(self._db.engine)

    def close(self) -> None:
        self._db.close()

    def prune(self, *, before: float) -> dict[str, int]:
        """`prune` on this store: idempotency records older than `before` (see the function)."""
        return prune(self._db, before=before)

    # -- keys ------------------------------------------------------------------------------

    def create(self, name: str, pay_to: list[str]) -> tuple[str, str]:
        """A new key for a seller owning `pay_to`; returns (key id, the full key, shown once)."""
        if not pay_to:
            raise ConfigError("an API key needs at least one payTo address")
        owned = {setting_address(address, "payTo") for address in pay_to}
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self._db.transaction() as tx:
            tx.execute(
                "INSERT INTO api_keys (key_id, secret_sha256, name, created_at) VALUES (?, ?, ?, ?)",
                (key_id, _digest(secret), name, time.time()),
            )
            tx.executemany(
                "INSERT INTO api_key_pay_to (key_id, pay_to) VALUES (?, ?)", [(key_id, a) for a in sorted(owned)]
            )
        return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"

    def revoke(self, key_id: str) -> bool:
        changed = self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (time.time(), key_id)
        )
        return changed == 1

    def list(self) -> list[ApiKey]:
        with self._db.read() as tx:
            rows = tx.all("SELECT key_id, name, revoked_at FROM api_keys ORDER BY created_at")
            owned = tx.all("SELECT key_id, pay_to FROM api_key_pay_to")
        by_key: dict[str, set[str]] = {}
        for key_id, address in owned:
            by_key.setdefault(key_id, set()).add(address)
        return [ApiKey(k, n, frozenset(by_key.get(k, ())), r is not None) for k, n, r in rows]

    def authenticate(self, presented: str) -> ApiKey | None:
        """The live key `presented` names, or None (unknown, wrong secret, revoked, malformed)."""
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != KEY_PREFIX:
            return None
        key_id, secret = parts[1], parts[2]
        # One statement: the key and the payTo it owns (a key always owns at least one).
        rows = self._db.all(
            "SELECT k.secret_sha256, k.name, k.revoked_at, p.pay_to FROM api_keys k "
            "JOIN api_key_pay_to p ON p.key_id = k.key_id WHERE k.key_id = ?",
            (key_id,),
        )
        if not rows or not hmac.compare_digest(rows[0][0], _digest(secret)) or rows[0][2] is not None:
            return None
        return ApiKey(key_id, rows[0][1], frozenset(r[3] for r in rows), False)

    # -- rate limit ------------------------------------------------------------------------

    def take(self, key_id: str, *, rate: float, burst: int) -> float:
        """Count one request of `key_id` against its limit (`burst` at once, refilled at `rate` per second),
        shared by every replica on this database: 0.0 if allowed, else the seconds until one would be.

        One statement, so two replicas counting at once each see the other's request.
        """
        interval = 1.0 / rate
        tolerance = burst * interval
        if self._db.all(self._take, (key_id, interval, interval, interval, tolerance)):
            return 0.0
        row = self._db.one(f"SELECT tat - {_NOW[self._db.engine]} FROM rate_limits WHERE key_id = ?", (key_id,))  # noqa: S608
        ahead = float(row[0]) if row is not None else tolerance
        return max(ahead + interval - tolerance, 0.001)  # another request may have moved it since: still refused

    # -- idempotency -----------------------------------------------------------------------

    def begin(self, key_id: str, idempotency_key: str, endpoint: str, body_sha256: str) -> Recorded | None:
        """Claim the key for this request; the earlier answer if it was answered already.

        Raises IdempotencyConflict: 422 for another body or endpoint under the key, 409 while
        its first request is still running. Two replicas given the same key at once: the insert
        lets one in, and the other reads the row that one holds (locked until its claim commits).
        """
        now = time.time()
        with self._db.transaction() as tx:
            inserted = tx.execute(
                "INSERT INTO idempotency (key_id, idempotency_key, endpoint, body_sha256, started_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key_id, idempotency_key) DO NOTHING",
                (key_id, idempotency_key, endpoint, body_sha256, now),
            ).rowcount
            if inserted == 1:
                return None
            row = tx.one(
                "SELECT endpoint, body_sha256, status, response, started_at FROM idempotency "  # noqa: S608 - constant
                f"WHERE key_id = ? AND idempotency_key = ?{tx.for_update(skip_locked=False)}",
                (key_id, idempotency_key),
            )
            if row is None:  # answered and abandoned between the two statements: claim it now
                tx.execute(
                    "INSERT INTO idempotency (key_id, idempotency_key, endpoint, body_sha256, started_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key_id, idempotency_key, endpoint, body_sha256, now),
                )
                return None
            was_endpoint, was_body, status, response, started_at = row
            if was_endpoint != endpoint or was_body != body_sha256:
                raise IdempotencyConflict(
                    422,
                    f"idempotency key {idempotency_key!r} was used for another request "
                    f"({was_endpoint}, body sha256 {was_body[:16]}...)",
                )
            if status is not None:
                return Recorded(int(status), json.loads(response))
            if now - float(started_at) < STALE_AFTER:
                raise IdempotencyConflict(409, f"a request with idempotency key {idempotency_key!r} is in progress")
            tx.execute(
                "UPDATE idempotency SET started_at = ? WHERE key_id = ? AND idempotency_key = ?",
                (now, key_id, idempotency_key),
            )
            return None

    def finish(self, key_id: str, idempotency_key: str, status: int, body: dict[str, object]) -> None:
        """Record the final answer (2xx or 4xx); replays of the key get it back."""
        self._db.execute(
            "UPDATE idempotency SET status = ?, response = ? WHERE key_id = ? AND idempotency_key = ?",
            (status, json.dumps(body), key_id, idempotency_key),
        )

    def abandon(self, key_id: str, idempotency_key: str) -> None:
        """Forget a claim whose request failed on our side (5xx): the same request may be sent again."""
        self._db.execute(
            "DELETE FROM idempotency WHERE key_id = ? AND idempotency_key = ? AND status IS NULL",
            (key_id, idempotency_key),
        )


def prune(db: Database, *, before: float) -> dict[str, int]:
    """Retention (`x402-escrow prune --role facilitator`, FacilitatorConfig.idempotency_retention): delete the
    idempotency records whose first request is older than `before` (Unix seconds), and rate-limit rows whose
    bucket is full again (no different from no row).

    Kept: every record younger than `before`, so a replay within the window still gets its recorded answer;
    and a claim still in flight (unanswered and younger than STALE_AFTER) whatever the window, so its answer is
    not lost to a prune that runs while it is being made. API keys and the ledger are kept.
    """
    in_flight = min(before, time.time() - STALE_AFTER)
    with db.transaction() as tx:
        records = tx.execute(
            "DELETE FROM idempotency WHERE started_at < ? AND (status IS NOT NULL OR started_at < ?)",
            (before, in_flight),
        )
        limits = tx.execute(f"DELETE FROM rate_limits WHERE tat < {_NOW[tx.engine]}")  # noqa: S608 - constant
        return {"idempotency": records.rowcount, "rate_limits": limits.rowcount}


__all__ = ["ApiKey", "IdempotencyConflict", "KeyStore", "Recorded", "body_digest", "prune"]
