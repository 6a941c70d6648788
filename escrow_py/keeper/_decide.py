"""The keeper's one decision, as a pure function: what to do about an open escrow, now.

Expiry is judged by chain time (the latest block's timestamp), never the local
clock: the contract refunds third parties only at or after the deadline by
block time, and a keeper whose clock runs ahead would only burn gas on reverts.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from escrow_py.keeper._store import OpenEscrow


@dataclass(frozen=True, slots=True)
class Refund:
    """Refund it now."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Not refundable before chain time `until` (the deadline)."""

    until: int


@dataclass(frozen=True, slots=True)
class Skip:
    """Leave it this round: `reason` says why."""

    reason: str


Action = Refund | Wait | Skip


def next_action(
    escrow: OpenEscrow,
    chain_time: int,
    *,
    wall_time: float,
    buyers: Collection[str] = (),
    sellers: Collection[str] = (),
) -> Action:
    """Decide for one open (deposited, unsettled) escrow. `wall_time` only paces retries."""
    terms = escrow.terms
    if buyers and terms.buyer not in buyers:
        return Skip("buyer not in filter")
    if sellers and terms.seller not in sellers:
        return Skip("seller not in filter")
    if chain_time < terms.deadline:
        return Wait(terms.deadline)
    if escrow.in_flight:
        return Skip("refund in flight")
    if escrow.retry_at is not None and wall_time < escrow.retry_at:
        return Skip("refund failed in simulation; retrying later")
    return Refund()
