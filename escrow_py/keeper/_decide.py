"""The keeper's one decision, as a pure function: what to do about an open escrow, now.

Expiry is judged by chain time (the latest block's timestamp), never the local
clock: the contract refunds third parties only at or after the deadline by
block time, and a keeper whose clock runs ahead would only burn gas on reverts.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

from escrow_py.keeper._store import OpenEscrow


@dataclass(frozen=True, slots=True)
class Refund:
    """Refund it now."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Not refundable by this keeper before chain time `until` (the deadline, plus a standby's delay)."""

    until: int


@dataclass(frozen=True, slots=True)
class Skip:
    """Leave it this round: `reason` says why."""

    reason: str


Action = Refund | Wait | Skip

TOKEN_NOT_ALLOWED = "token not in the allowlist"  # noqa: S105 - a reason, not a secret
PAYOUT_REFUSED = "the token refused this buyer's refund; backing off"


def next_action(
    escrow: OpenEscrow,
    chain_time: int,
    *,
    wall_time: float,
    buyers: Collection[str] = (),
    sellers: Collection[str] = (),
    tokens: Collection[str] | None = None,
    standby_after: float = 0.0,
) -> Action:
    """Decide for one open (deposited, unsettled) escrow.

    `buyers`, `sellers` and `tokens` are lower-case addresses (`tokens` None: every token);
    `wall_time` only paces retries: of refunds that failed in simulation, and of buyers whose
    payouts the token refused (`backoff_until`, per token and buyer); a standby keeper
    (`standby_after` > 0) leaves each escrow to the active one for that many seconds past its deadline.
    """
    if (reason := _not_ours(escrow, buyers, sellers, tokens)) is not None:
        return Skip(reason)
    if chain_time < escrow.deadline + standby_after:
        return Wait(escrow.deadline + math.ceil(standby_after))
    if escrow.in_flight:
        return Skip("refund in flight")
    if escrow.retry_at is not None and wall_time < escrow.retry_at:
        return Skip("refund failed in simulation; retrying later")
    if escrow.backoff_until is not None and wall_time < escrow.backoff_until:
        return Skip(PAYOUT_REFUSED)
    return Refund()


def _not_ours(
    escrow: OpenEscrow, buyers: Collection[str], sellers: Collection[str], tokens: Collection[str] | None
) -> str | None:
    """Why this keeper leaves the escrow alone whatever the time, if it does."""
    if buyers and escrow.buyer not in buyers:
        return "buyer not in filter"
    if sellers and escrow.seller not in sellers:
        return "seller not in filter"
    if tokens is not None and escrow.token not in tokens:
        return TOKEN_NOT_ALLOWED
    if escrow.quarantined is not None:
        return f"quarantined: {escrow.quarantined}"
    return None
