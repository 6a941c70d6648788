"""Posts queued delivery hashes with deliverMany, and retries refunds that did not go through.

Everything it needs is in the store, so a new poster on the same file (after a
restart) picks up where the last one stopped. An entry whose deadline has
passed is never posted (the contract would revert the whole batch, and the
escrow now belongs to the buyer's refund); an entry found settled on chain is
closed without a transaction.

A posted delivery is followed until its transaction is `confirmation_depth`
blocks deep: if a reorg takes it away while the escrow is Held again, it goes
back to the queue and is sent again while its deadline allows. Each pass also
lets the operator's TxSender look at every transaction it sent, so a reorged-out
one resynchronises the cached nonce before the next transaction is signed.

Each completed sale is one INFO line on `escrow_py.seller.sales`, with its
fields as key=value: `sale delivered escrow_id=0x.. amount=10000 route="GET
/report/{item}" buyer=0x.. deposit_tx=0x.. delivery_tx=0x..`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field

import anyio.to_thread
from web3.exceptions import Web3Exception

from escrow_py.errors import EscrowError
from escrow_py.seller._chain import SellerChain
from escrow_py.seller._store import EXPIRED, POSTED, SETTLED_ELSEWHERE, SellerStore
from escrow_py.terms import State, Terms

log = logging.getLogger("escrow_py.seller.poster")
sales = logging.getLogger("escrow_py.seller.sales")

# A delivery mined at or after the deadline reverts: leave the next block room.
DEADLINE_MARGIN = 2
BATCH_SIZE = 50


@dataclass
class PostReport:
    """What one pass did."""

    posted: list[bytes] = field(default_factory=list)
    tx_hash: bytes | None = None
    reposted: list[bytes] = field(default_factory=list)  # their delivery transaction vanished in a reorg
    final: list[bytes] = field(default_factory=list)  # their delivery is confirmation_depth blocks deep
    expired: list[bytes] = field(default_factory=list)
    settled: list[bytes] = field(default_factory=list)
    refunded: list[bytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def log_sale(outcome: str, escrow_id: bytes, terms: Terms, **fields: str | bytes | None) -> None:
    """The one INFO line of a sale, with its fields as key=value (and as LogRecord attributes)."""
    values: dict[str, object] = {"escrow_id": escrow_id, "amount": terms.amount, **fields, "buyer": terms.buyer}
    shown = {k: ("0x" + v.hex() if isinstance(v, bytes) else v) for k, v in values.items() if v is not None}
    text = " ".join(f'{k}="{v}"' if isinstance(v, str) and " " in v else f"{k}={v}" for k, v in shown.items())
    sales.info("sale %s %s", outcome, text, extra={"sale": outcome, **shown})


class DeliveryPoster:
    """Runs `post_pending` every `interval` seconds in the background, or on demand with `flush()`."""

    def __init__(self, chain: SellerChain, store: SellerStore, *, interval: float = 0.5) -> None:
        self.chain = chain
        self.store = store
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        # A thread lock, not an asyncio one: passes are run from worker threads, and a
        # caller may flush from another thread's event loop (an asyncio.Lock bound to
        # one loop never wakes a waiter on another, which hangs that caller).
        self._pass = threading.Lock()

    def post_pending(self) -> PostReport:
        """One pass (blocking): post every pending delivery still in time, in one deliverMany per batch.

        Passes never overlap, whichever thread or event loop asks for them.
        """
        with self._pass:
            return self._post_pending()

    def _post_pending(self) -> PostReport:
        report = PostReport()
        self._follow_posted(report)
        self._retry_refunds(report)
        while True:
            pending = self.store.pending_deliveries(BATCH_SIZE)
            if not pending:
                return report
            now = self.chain.now()
            batch, expired, settled = [], [], []
            for entry in pending:
                if entry.terms.deadline <= now + DEADLINE_MARGIN:
                    expired.append(entry.escrow_id)
                elif self.chain.state_of(entry.escrow_id) == State.HELD:
                    batch.append(entry)
                else:
                    settled.append(entry.escrow_id)
            self.store.mark_deliveries(expired, EXPIRED)
            self.store.mark_deliveries(settled, SETTLED_ELSEWHERE)
            report.expired.extend(expired)
            report.settled.extend(settled)
            if not batch:
                continue
            ids = [e.escrow_id for e in batch]
            try:
                receipt = self.chain.deliver_many([(e.terms, e.delivery_hash) for e in batch])
            except (EscrowError, OSError, TimeoutError, Web3Exception) as exc:
                # Left pending: the next pass retries (and drops what expired meanwhile).
                log.warning("deliverMany of %d entries failed: %s", len(ids), exc)
                self.store.note_attempt(ids, str(exc))
                report.errors.append(str(exc))
                return report
            tx_hash = bytes(receipt["transactionHash"])
            self.store.mark_deliveries(ids, POSTED, tx_hash)
            report.posted.extend(ids)
            report.tx_hash = tx_hash
            for entry in batch:
                log_sale(
                    "delivered",
                    entry.escrow_id,
                    entry.terms,
                    route=entry.route,
                    deposit_tx=entry.deposit_tx,
                    delivery_tx=tx_hash,
                )

    def _follow_posted(self, report: PostReport) -> None:
        """Posted deliveries until they are deep enough: one a reorg took away is queued again."""
        depth = self.chain.config.confirmation_depth
        watched = self.chain.sender.watch(depth)
        for dropped in watched.dropped:
            log.warning("transaction 0x%s (nonce %d) vanished in a reorg", dropped.tx_hash.hex(), dropped.nonce)
        posted = self.store.posted_unsettled()
        if not posted:
            return
        head = int(self.chain.w3.eth.block_number)
        final, again = [], []
        for entry in posted:
            receipt = self.chain.sender.receipt(entry.tx_hash)
            if receipt is not None and receipt["status"] == 1:
                if head - int(receipt["blockNumber"]) + 1 >= depth:
                    final.append(entry.escrow_id)
                continue
            state = self.chain.state_of(entry.escrow_id)
            if state == State.HELD:
                again.append(entry.escrow_id)
                log.warning(
                    "delivery of 0x%s: its transaction 0x%s is no longer on chain (a reorg); sending it again",
                    entry.escrow_id.hex(),
                    entry.tx_hash.hex(),
                )
            elif state == State.NONE:
                # The deposit went with the reorg too: nothing to deliver, and nothing was paid.
                final.append(entry.escrow_id)
                log.error(
                    "escrow 0x%s: its deposit and delivery vanished in a reorg; the response was served unpaid",
                    entry.escrow_id.hex(),
                )
            else:
                final.append(entry.escrow_id)  # settled by another transaction: nothing left to follow
        self.store.mark_final(final)
        self.store.repost(again, "its transaction vanished in a reorg")
        report.final.extend(final)
        report.reposted.extend(again)

    def _retry_refunds(self, report: PostReport) -> None:
        for escrow_id, terms in self.store.refunds_pending():
            try:
                if self.chain.state_of(escrow_id) != State.HELD:
                    self.store.set_refunded(escrow_id, None)
                    continue
                receipt = self.chain.refund(terms)
            except (EscrowError, OSError, TimeoutError, Web3Exception) as exc:
                log.warning("refund of 0x%s failed again: %s", escrow_id.hex(), exc)
                report.errors.append(str(exc))
                continue
            refund_tx = bytes(receipt["transactionHash"])
            self.store.set_refunded(escrow_id, refund_tx)
            report.refunded.append(escrow_id)
            log_sale("refunded", escrow_id, terms, refund_tx=refund_tx)

    async def flush(self) -> PostReport:
        """One pass now, off the event loop; passes never overlap."""
        return await anyio.to_thread.run_sync(self.post_pending)

    async def _run(self) -> None:
        while True:
            try:
                await self.flush()
            except Exception:  # an RPC outage must not kill the poster: it retries
                log.exception("delivery poster pass failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="escrow-delivery-poster")

    async def stop(self) -> None:
        """Stop the loop, then one last pass so nothing queued waits for the next start."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self.flush()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()
