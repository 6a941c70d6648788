"""A payment's claim across replicas, and the heartbeat that keeps a live holder's claims from lapsing.

A claim is a lease row in the store (SellerStore.take_lease): one request, in one replica, works on a
payment at a time, and a holder that dies stops renewing, so its claim lapses after `claim_seconds`
and another replica takes the payment over. The renewal must therefore track whether the holder's
*process* is alive, not whether its event loop or its worker threads have time: a handler that
blocks the loop, or deposits waiting for receipts that fill the worker threads, must not make a live
holder look dead. So the renewals run on a thread of their own, one per middleware, which renews
every claim the process holds in one statement a third of a lease apart.

A holder can still lose its claim (a process paused past its lease, a store unreachable for a whole
lease): the heartbeat marks it `lost`, and the store itself refuses the holder's answer (the save and
the claim's release are one transaction that writes nothing unless this owner still holds it).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from escrow_py.seller._store import SellerStore

log = logging.getLogger("escrow_py.seller")


@dataclass(slots=True)
class Claim:
    """The payment's claim (a lease row) this request holds; `released` once given up."""

    name: str
    owner: str
    finishing: bool = False  # the answer is being stored: no more renewals
    released: bool = False  # the store write that stored the answer deleted the lease row too
    lost: bool = False  # a renewal found another owner on it (or no row): this request must not answer it
    renewed_at: float = 0.0  # lease_clock() just before the statement that last took or renewed it

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.owner

    def hand_over(self) -> tuple[str, str]:
        """The lease, for the store write that answers the payment to delete in its own transaction."""
        self.finishing = True
        return self.key


def lease_clock() -> float:
    """Seconds on a clock that keeps running while the process is stopped or the machine suspended.

    Read just *before* a statement takes or renews a lease, it bounds the lease from below: the database
    set the expiry later than that, so while less than the lease's length has passed on this clock the
    lease cannot have lapsed (only clock rates matter, not whether two machines agree on the time)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


class ClaimHeartbeat:
    """Renews every claim one process holds, from a thread of its own, every third of `seconds`.

    The thread runs while there are claims to renew and ends when the last one is dropped.
    """

    def __init__(self, store: SellerStore, seconds: float) -> None:
        self.store = store
        self.seconds = seconds
        self._claims: dict[tuple[str, str], Claim] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def take(self, claim: Claim) -> bool:
        """Take `claim` in the store (False while another owner holds it); once taken, it is renewed until dropped."""
        started = lease_clock()
        if not self.store.take_lease(claim.name, claim.owner, self.seconds):
            return False
        claim.renewed_at = started
        self._hold(claim)
        return True

    def _hold(self, claim: Claim) -> None:
        with self._lock:
            self._claims[claim.key] = claim
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="escrow-claims", daemon=True)
                self._thread.start()

    def drop(self, claim: Claim) -> None:
        with self._lock:
            self._claims.pop(claim.key, None)

    def confirm(self, claim: Claim) -> bool:
        """True while this request still holds `claim`, with at least half a lease ahead; else it is marked lost.

        Called before what must not be done twice (the handler, a refund): a holder that was paused past
        its lease finds out here, even before its heartbeat runs again. A claim taken or renewed less than
        half a lease ago (lease_clock) cannot have lapsed and needs no statement; an older one is renewed now.
        """
        if claim.lost:
            return False
        started = lease_clock()
        if self.fresh(claim, started):
            return True
        if claim.key in self.store.renew_leases([claim.key], self.seconds):
            claim.renewed_at = max(claim.renewed_at, started)
        else:
            self._lose(claim)
        return not claim.lost

    def fresh(self, claim: Claim, now: float | None = None) -> bool:
        """Held with at least half a lease ahead on lease_clock (`now`, else read it): `confirm` would make no
        statement, so a caller on the event loop need not hand it to a worker thread."""
        now = lease_clock() if now is None else now
        return not claim.lost and now - claim.renewed_at < self.seconds / 2

    def _beat(self) -> None:
        while True:
            time.sleep(self.seconds / 3)
            with self._lock:
                if not self._claims:
                    self._thread = None
                    return
                claims = [c for c in self._claims.values() if not (c.finishing or c.lost)]
            if not claims:
                continue
            started = lease_clock()
            try:
                renewed = self.store.renew_leases([c.key for c in claims], self.seconds)
            except Exception:  # the store's hiccup (any kind: this thread must not die of it): next beat
                log.exception("%d payment claims not renewed", len(claims))
                continue
            with self._lock:
                for claim in claims:
                    if claim.key in renewed:
                        claim.renewed_at = max(claim.renewed_at, started)
                # One handed over or dropped meanwhile was deleted by the save or release that ended it: not lost.
                missing = [c for c in claims if c.key not in renewed and c.key in self._claims and not c.finishing]
            for claim in missing:
                self._lose(claim)

    @staticmethod
    def _lose(claim: Claim) -> None:
        claim.lost = True
        log.error("claim %s lost to another replica while handling it (this process stalled past its lease)",
                  claim.name)  # fmt: skip
