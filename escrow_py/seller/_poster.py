"""Posts queued delivery hashes with deliverMany, and retries refunds that did not go through.

Everything it needs is in the store, so a new poster on the same file (after a
restart) picks up where the last one stopped. An entry whose deadline has
passed is never posted (the escrow now belongs to the buyer's refund); an entry
found settled on chain is closed without a transaction.

A delivery is `posted` only if its `Delivered` event is in our deliverMany's
receipt. The contract skips an entry that is no longer Held or past its deadline,
and puts back to Held (with `PayoutFailed`) the entries whose payout the token
refused; for those the escrow's state at the receipt's block says what they
became: released by someone else (`settled`), `refunded`, `expired`, or, when the
payout was refused, still `pending`, tried again with backoff until the deadline.

A posted delivery is followed until its transaction is `confirmation_depth`
blocks deep: if a reorg takes it away while the escrow is Held again, it goes
back to the queue and is sent again while its deadline allows. Each pass also
lets the operator's TxSender look at every transaction it sent, so a reorged-out
one resynchronises the cached nonce before the next transaction is signed.

Replicas on one store share one queue and one operator key, so one poster at a
time posts for them all: a pass runs only while its poster holds the store's lease
`poster:<operator address>`, renewed every third of `lease` seconds during the
pass and taken at the start of the next. A holder that dies stops renewing, and
another replica's poster takes the lease over at its first pass after it lapses.

Each completed sale is one INFO line on `escrow_py.seller.sales`, with its
fields as key=value: `sale delivered escrow_id=0x.. amount=10000 route="GET
/report/{item}" buyer=0x.. deposit_tx=0x.. delivery_tx=0x..`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
from dataclasses import dataclass, field
from enum import StrEnum

import anyio.to_thread
from web3.types import TxReceipt

from escrow_py.chain.escrow import Delivered, PayoutFailed, Settled, Settlement, SettlementSkipped
from escrow_py.chain.port import EscrowChain
from escrow_py.protocol.errors import EscrowError
from escrow_py.protocol.terms import State, Terms
from escrow_py.protocol.wire import EscrowPayload
from escrow_py.seller._config import SellerConfig
from escrow_py.seller._machine import replayed, stored_envelope, stored_escrow_payload
from escrow_py.seller._offers import SellerHooks
from escrow_py.seller._store import DeliveryStatus, PendingDelivery, QueuedSettlement, SellerStore, SettleStatus

log = logging.getLogger("escrow_py.seller.poster")
sales = logging.getLogger("escrow_py.seller.sales")

# A delivery mined at or after the deadline is skipped: leave the next block room.
DEADLINE_MARGIN = 2
BATCH_SIZE = 50
# A delivery the token refused to pay out is tried again after 1, 2, 4, ... seconds, at most a minute apart.
RETRY_FIRST = 1.0
RETRY_CAP = 60.0


@dataclass
class PostReport:
    """What one pass did."""

    posted: list[bytes] = field(default_factory=list)  # delivered by our transaction: its Delivered event
    tx_hash: bytes | None = None
    reposted: list[bytes] = field(default_factory=list)  # their delivery transaction vanished in a reorg
    final: list[bytes] = field(default_factory=list)  # their delivery is confirmation_depth blocks deep
    expired: list[bytes] = field(default_factory=list)  # still Held at their deadline: the buyer's to refund
    settled: list[bytes] = field(default_factory=list)  # found Released by another transaction
    refunded_elsewhere: list[bytes] = field(default_factory=list)  # found Refunded (not by this pass)
    payout_refused: list[bytes] = field(default_factory=list)  # the token refused the payout: retried later
    deferred: list[bytes] = field(default_factory=list)  # Held, not delivered, no reason seen: retried later
    refunded: list[bytes] = field(default_factory=list)  # failed handlers' refunds this pass sent
    settled_first: list[bytes] = field(default_factory=list)  # serve-first payments our settleMany paid
    settle_txs: list[bytes] = field(default_factory=list)  # the settleMany transactions this pass sent
    lost: list[bytes] = field(default_factory=list)  # serve-first payments that will never pay (skipped, expired)
    resettled: list[bytes] = field(default_factory=list)  # their settlement vanished in a reorg: queued again
    errors: list[str] = field(default_factory=list)


def undelivered_outcome(state: State, deadline: int, chain_time: int, payout_refused: bool) -> str:
    """The delivery status of an entry that was not delivered, from its escrow's `state` at `chain_time`.

    Released: someone else delivered it. Refunded: recorded as such. Held at or past its
    deadline: expired (the contract skips it; the buyer's refund is due). Held otherwise (its
    payout refused, or a deposit a reorg removed for now): still pending, retried later.
    """
    if state == State.RELEASED:
        return DeliveryStatus.SETTLED_ELSEWHERE
    if state == State.REFUNDED:
        return DeliveryStatus.REFUNDED_ON_CHAIN
    if deadline <= chain_time:
        return DeliveryStatus.EXPIRED
    return DeliveryStatus.PENDING


def retry_delay(attempts: int) -> float:
    """Seconds before a delivery that did not go through is tried again, after `attempts` earlier tries."""
    return float(min(RETRY_CAP, RETRY_FIRST * 2 ** min(attempts, 16)))


class Sale(StrEnum):
    """How a sale ended, as its line on `escrow_py.seller.sales` says it (`sale <outcome> ...`)."""

    DELIVERED = "delivered"  # hold: our deliverMany released it to the seller
    REFUNDED = "refunded"  # hold: the handler failed and the escrow went back to the buyer
    SETTLED = "settled"  # serve-first: our settleMany pulled the payment
    LOST = "lost"  # serve-first: the settlement was skipped; served unpaid
    DECLINED = "declined"  # serve-first: the seller's before-settle hook declined to collect


def log_sale(outcome: Sale, escrow_id: bytes, terms: Terms, **fields: str | bytes | None) -> None:
    """The one INFO line of a sale, with its fields as key=value (and as LogRecord attributes)."""
    values: dict[str, object] = {"escrow_id": escrow_id, "amount": terms.amount, **fields, "buyer": terms.buyer}
    shown = {k: ("0x" + v.hex() if isinstance(v, bytes) else v) for k, v in values.items() if v is not None}
    text = " ".join(f'{k}="{v}"' if isinstance(v, str) and " " in v else f"{k}={v}" for k, v in shown.items())
    sales.info("sale %s %s", outcome, text, extra={"sale": outcome, **shown})


def _settlement(queued: QueuedSettlement) -> Settlement:
    payload = stored_escrow_payload(queued.payload)
    return Settlement(payload.terms, payload.authorization, payload.signature, queued.delivery_hash)


async def run_settled_hooks(hooks: SellerHooks | None, store: SellerStore, ids: list[bytes], network: str) -> None:
    """The seller's after-settle hooks for serve-first settlements a worker now knows mined or lost (the local
    poster, the facilitator-mode outbox), after it recorded them: once per outcome it records, with the result
    a replay would answer (`success`, the settlement transaction, or `settlement_failed` and why in
    `errorMessage`). Phase "after-handler", no transport context: the request has long gone."""
    if hooks is None or not hooks.after_settle:
        return
    for escrow_id in ids:
        payment, record = await anyio.to_thread.run_sync(
            lambda i=escrow_id: (store.payment(i), store.settlement(i))  # type: ignore[misc]
        )
        envelope = stored_envelope(record.payload if record is not None else None)
        if payment is None or record is None or envelope is None:
            log.warning("after-settle hooks skipped for 0x%s: no x402 envelope is stored with it", escrow_id.hex())
            continue
        result = replayed(payment, settlement=record).settle_response(payment.terms.buyer, network)
        if record.status == SettleStatus.LOST:
            result.error_message = record.reason
        await hooks.after_settled(envelope, envelope.accepted, result, escrow_id, phase="after-handler")


class Redeposit(StrEnum):
    """What sending again a deposit a reorg removed came to."""

    DEPOSITED = "deposited"  # it is Held again (sent now, or found deposited)
    LOST = "lost"  # no stored signature, or the authorization is spent, cancelled or expired
    RETRY = "retry"  # the send failed; the next pass tries again


class DeliveryPoster:
    """Runs `post_pending` every `interval` seconds in the background, or on demand with `flush()`."""

    def __init__(
        self,
        chain: EscrowChain,
        store: SellerStore,
        *,
        interval: float = 0.5,
        lease: float = 5.0,
        owner: str | None = None,
        confirmation_depth: int = 5,
        settle_batch_wait: float = 0.0,
        hooks: SellerHooks | None = None,
        network: str = "",
    ) -> None:
        """`confirmation_depth`, `settle_batch_wait`, `hooks` and `network` as in SellerConfig (the hooks' after-settle
        run for each serve-first settlement a pass finds mined or lost, once `flush` has recorded it)."""
        self.chain = chain
        self.hooks = hooks
        self.network = network
        self.depth = confirmation_depth
        self.settle_batch_wait = settle_batch_wait
        self.store = store
        self.interval = interval
        self.lease = lease
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.lease_name = f"poster:{chain.sender_address}"
        self._lost = threading.Event()  # set when a renewal during a pass found the lease taken
        self._holding = False  # held the lease at the last pass (else the next one taken starts by finishing)
        self._followed_at: tuple[int, bytes] | None = None  # (number, hash) of the head the last follow saw
        self._task: asyncio.Task[None] | None = None
        # A thread lock, not an asyncio one: passes are run from worker threads, and a
        # caller may flush from another thread's event loop (an asyncio.Lock bound to
        # one loop never wakes a waiter on another, which hangs that caller).
        self._pass = threading.Lock()

    @classmethod
    def of(
        cls, config: SellerConfig, chain: EscrowChain, store: SellerStore, *, owner: str | None = None
    ) -> DeliveryPoster:
        """The poster a seller (or a facilitator, with its seller settings) runs with `config`'s settings."""
        return cls(
            chain,
            store,
            interval=config.poster_interval,
            lease=config.poster_lease,
            owner=owner,
            confirmation_depth=config.confirmation_depth,
            settle_batch_wait=config.settle_batch_wait,
            hooks=config.hooks,
            network=config.network,
        )

    def post_pending(self, *, force_settle: bool = False) -> PostReport:
        """One pass (blocking): post every pending delivery still in time, in one deliverMany per batch, and
        send the queued serve-first settlements (`force_settle`: even within `settle_batch_wait`).

        Passes never overlap, whichever thread or event loop asks for them.
        """
        with self._pass:
            # The process's own transactions (its deposits too) are followed whether or not it posts.
            watched = self.chain.watch(self.depth)
            for dropped in watched.dropped:
                log.warning("transaction 0x%s (nonce %d) vanished in a reorg", dropped.tx_hash.hex(), dropped.nonce)
            if not self.store.take_lease(self.lease_name, self.owner, self.lease):
                self._holding = False
                return PostReport()  # another replica's poster holds the key's lease
            self._lost.clear()
            stop = threading.Event()
            renewer = threading.Thread(target=self._renew, args=(stop,), daemon=True, name="escrow-poster-lease")
            renewer.start()
            try:
                report = PostReport()
                if not self._holding:
                    # Just taken (at start, or over from a poster that died): first finish what the key has in
                    # flight, so nothing is sent again at a new nonce nor queued behind a transaction nobody follows.
                    self._finish_unmined(report)
                    self._holding = not report.errors
                return self._post_pending(force_settle, report)
            finally:
                stop.set()
                renewer.join()

    @property
    def holds_lease(self) -> bool:
        held = self.store.lease_holder(self.lease_name)
        return held is not None and held[0] == self.owner

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.lease / 3):
            try:
                if not self.store.take_lease(self.lease_name, self.owner, self.lease):
                    self._lost.set()
                    self._holding = False
                    log.error(
                        "poster lease %s lost mid-pass (this pass stalled past %.0fs)", self.lease_name, self.lease
                    )
                    return
            except Exception:  # a store hiccup: the next renewal tries again
                log.exception("poster lease %s not renewed", self.lease_name)

    def _finish_unmined(self, report: PostReport) -> None:
        """The key's transactions signed at nonces still unused (by a poster that died holding the lease, or a
        replica's deposit nobody follows now), each finished at its own nonce (sent again, or repriced), and
        what their receipts delivered or settled recorded as this poster's own."""
        try:
            receipts = self.chain.finish_unmined()
        except (EscrowError, OSError, TimeoutError) as exc:
            log.warning("transactions left in flight by another process not finished yet: %s", exc)
            report.errors.append(str(exc))
            return
        for receipt in receipts:
            tx_hash = bytes(receipt["transactionHash"])
            delivered = [e.id for e in self.chain.events_in(receipt) if isinstance(e, Delivered)]
            settled = [e.id for e in self.chain.settlements_in(receipt) if isinstance(e, Settled)]
            if delivered:
                self.store.mark_deliveries(delivered, DeliveryStatus.POSTED, tx_hash)
                report.posted.extend(delivered)
                report.tx_hash = tx_hash
            if settled:
                self.store.mark_settled(settled, tx_hash)
                report.settled_first.extend(settled)
                report.settle_txs.append(tx_hash)
            log.warning("transaction 0x%s left in flight by another process finished (nonce of the key)", tx_hash.hex())

    def _post_pending(self, force_settle: bool, report: PostReport) -> PostReport:
        self._follow_posted(report)
        self._follow_settled(report)
        self._retry_refunds(report)
        self._settle_queued(report, force=force_settle)
        while not self._lost.is_set():
            now = self.chain.next_block_time()
            # Past (or too close to) its deadline, a delivery would be skipped: the escrow is the buyer's now.
            report.expired.extend(self.store.expire_pending(now + DEADLINE_MARGIN))
            pending = self.store.pending_deliveries(BATCH_SIZE)
            if not pending:
                return report
            batch: list[PendingDelivery] = []
            for entry in pending:
                state = self.chain.state_of(entry.escrow_id)
                if state == State.HELD:
                    batch.append(entry)
                else:
                    self._record_undelivered(report, entry, state, now, payout_refused=None)
            if not batch:
                continue
            ids = [e.escrow_id for e in batch]
            try:
                receipt = self.chain.deliver_many([(e.terms, e.delivery_hash) for e in batch])
            except (EscrowError, OSError, TimeoutError) as exc:
                # Left pending: the next pass retries (and drops what expired meanwhile).
                log.warning("deliverMany of %d entries failed: %s", len(ids), exc)
                self.store.note_attempt(ids, str(exc))
                report.errors.append(str(exc))
                return report
            self._judge_receipt(report, batch, receipt)
        return report

    def _judge_receipt(self, report: PostReport, batch: list[PendingDelivery], receipt: TxReceipt) -> None:
        """Mark posted what our transaction delivered (its Delivered event is in the receipt); find out why not
        for the rest: the contract skips an entry that is no longer Held or past its deadline, and puts one
        whose payout the token refused back to Held."""
        tx_hash = bytes(receipt["transactionHash"])
        delivered = {e.id for e in self.chain.events_in(receipt) if isinstance(e, Delivered)}
        posted = [e for e in batch if e.escrow_id in delivered]
        self.store.mark_deliveries([e.escrow_id for e in posted], DeliveryStatus.POSTED, tx_hash)
        report.posted.extend(e.escrow_id for e in posted)
        report.tx_hash = tx_hash
        for entry in posted:
            log_sale(
                Sale.DELIVERED,
                entry.escrow_id,
                entry.terms,
                route=entry.route,
                deposit_tx=entry.deposit_tx,
                delivery_tx=tx_hash,
            )
        missed = [e for e in batch if e.escrow_id not in delivered]
        if not missed:
            return
        block = int(receipt["blockNumber"])
        block_time = self.chain.block_time(block)
        refused = self.chain.payout_failures_in(receipt)
        for entry in missed:
            failure = next((f for f in refused if (f.token, f.to) == (entry.terms.token, entry.terms.seller)), None)
            # The state as the transaction left it: what it skipped, or what it put back.
            state = self.chain.state_of(entry.escrow_id, block=block)
            self._record_undelivered(report, entry, state, block_time, payout_refused=failure, tx_hash=tx_hash)

    def _record_undelivered(
        self,
        report: PostReport,
        entry: PendingDelivery,
        state: State,
        chain_time: int,
        *,
        payout_refused: PayoutFailed | None,
        tx_hash: bytes | None = None,
    ) -> None:
        """Record why `entry` was not delivered (found `state` at `chain_time`): settled, refunded, expired,
        or kept pending and retried later with backoff."""
        escrow_id, terms = entry.escrow_id, entry.terms
        shown = f"0x{escrow_id.hex()}" + (f" (deliverMany 0x{tx_hash.hex()})" if tx_hash else "")
        outcome = undelivered_outcome(state, terms.deadline, chain_time, payout_refused is not None)
        if outcome == DeliveryStatus.SETTLED_ELSEWHERE:
            self.store.mark_deliveries([escrow_id], DeliveryStatus.SETTLED_ELSEWHERE)
            report.settled.append(escrow_id)
            log.info("delivery of %s: already released by another transaction", shown)
        elif outcome == DeliveryStatus.REFUNDED_ON_CHAIN:
            self.store.mark_deliveries([escrow_id], DeliveryStatus.REFUNDED_ON_CHAIN)
            report.refunded_elsewhere.append(escrow_id)
            log.warning("delivery of %s: the escrow was refunded to buyer %s instead", shown, terms.buyer)
        elif outcome == DeliveryStatus.EXPIRED:
            self.store.mark_deliveries([escrow_id], DeliveryStatus.EXPIRED)
            report.expired.append(escrow_id)
            log.warning("delivery of %s: deadline %d passed before it landed; refundable", shown, terms.deadline)
        else:
            delay = retry_delay(entry.attempts)
            if payout_refused is not None:
                why = (
                    f"the token refused the payout (PayoutFailed token={payout_refused.token} "
                    f"to={payout_refused.to} amount={payout_refused.amount}); the escrow is Held again"
                )
                report.payout_refused.append(escrow_id)
            else:
                why = f"the escrow is {state.name} on chain"
                report.deferred.append(escrow_id)
            self.store.defer([(escrow_id, delay)], why)
            log.warning(
                "delivery of %s not made: %s; retried in %.0fs, until deadline %d", shown, why, delay, terms.deadline
            )

    def _follow_posted(self, report: PostReport) -> None:
        """Posted deliveries until they are deep enough: one a reorg took away is queued again."""
        depth = self.depth
        # Nothing can have moved while the chain's head is the block it was at the last pass.
        latest = self.chain.head()
        tip = (latest.number, latest.hash)
        if tip == self._followed_at:
            return
        posted = self.store.posted_unsettled()
        if not posted:
            self._followed_at = tip
            return
        head = latest.number
        final, again, refunded = [], [], []
        receipts: dict[bytes, TxReceipt | None] = {}
        delivered: dict[bytes, set[bytes]] = {}  # per transaction: the ids its Delivered events name
        for entry in posted:
            if entry.tx_hash not in receipts:
                receipt = receipts[entry.tx_hash] = self.chain.receipt(entry.tx_hash)
                events = self.chain.events_in(receipt) if receipt is not None else []
                delivered[entry.tx_hash] = {e.id for e in events if isinstance(e, Delivered)}
            receipt = receipts[entry.tx_hash]
            # Mined again after a reorg, the same transaction may now have skipped this entry.
            if receipt is not None and receipt["status"] == 1 and entry.escrow_id in delivered[entry.tx_hash]:
                if head - int(receipt["blockNumber"]) + 1 >= depth:
                    final.append(entry.escrow_id)
                continue
            state = self.chain.state_of(entry.escrow_id)
            if state == State.HELD:
                again.append(entry.escrow_id)
                log.warning(
                    "delivery of 0x%s: its transaction 0x%s no longer delivers it (a reorg); sending it again",
                    entry.escrow_id.hex(),
                    entry.tx_hash.hex(),
                )
            elif state == State.NONE:
                # The deposit went with the reorg too: send it again from the stored signature, then the delivery.
                outcome = self._deposit_again(entry.escrow_id)
                if outcome == Redeposit.DEPOSITED:
                    again.append(entry.escrow_id)
                elif outcome == Redeposit.LOST:
                    final.append(entry.escrow_id)
                    log.error(
                        "escrow 0x%s: its deposit and delivery vanished in a reorg and the deposit cannot be sent "
                        "again; the response was served unpaid",
                        entry.escrow_id.hex(),
                    )
            elif state == State.REFUNDED:
                refunded.append(entry.escrow_id)
                log.warning("escrow 0x%s: its delivery vanished in a reorg and it was refunded", entry.escrow_id.hex())
            else:
                final.append(entry.escrow_id)  # released by another transaction: nothing left to follow
        self.store.mark_final(final)
        self.store.mark_deliveries(refunded, DeliveryStatus.REFUNDED_ON_CHAIN, was=DeliveryStatus.POSTED)
        self.store.repost(again, "its transaction vanished in a reorg")
        self._followed_at = tip
        report.final.extend(final)
        report.reposted.extend(again)
        report.refunded_elsewhere.extend(refunded)

    def _deposit_again(self, escrow_id: bytes) -> Redeposit:
        """Re-send a deposit a reorg removed (see Redeposit)."""
        stored = self.store.deposit_payload(escrow_id)
        if stored is None:
            return Redeposit.LOST
        payload = EscrowPayload.from_json(json.loads(stored))
        if self.chain.authorization_used(payload.terms.token, payload.terms.buyer, escrow_id):
            return Redeposit.LOST
        try:
            receipt = self.chain.deposit(payload)
        except (EscrowError, OSError, TimeoutError) as exc:
            if self.chain.state_of(escrow_id) == State.HELD:
                return Redeposit.DEPOSITED
            if min(payload.authorization.valid_before, payload.terms.deadline) <= self.chain.next_block_time():
                return Redeposit.LOST
            log.warning("deposit of 0x%s again after a reorg failed: %s; retried next pass", escrow_id.hex(), exc)
            return Redeposit.RETRY
        self.store.set_held_again(escrow_id, bytes(receipt["transactionHash"]))
        log.warning("escrow 0x%s: its deposit vanished in a reorg; sent again", escrow_id.hex())
        return Redeposit.DEPOSITED

    # -- serve-first settlements -----------------------------------------------------------

    def _settle_queued(self, report: PostReport, *, force: bool = False) -> None:
        """Send every queued serve-first settlement still in time, in one settleMany per batch.

        The contract pays the seller once per batch; an entry whose pull fails (the buyer moved its
        funds, cancelled the authorization) is skipped, and recorded here as a loss: logged, counted
        (`SellerStore.losses`), and its buyer is refused serve-first from then on.
        """
        while self.store.exposure() > 0:  # anything served first and unpaid (a hold-only seller: no RPC here)
            now = self.chain.next_block_time()
            lost, dropped = self.store.expire_settlements(now + DEADLINE_MARGIN)
            for escrow_id in lost:
                report.lost.append(escrow_id)
                log.error("settlement of 0x%s: its authorization expired before it was sent; a loss", escrow_id.hex())
            for escrow_id in dropped:
                log.warning("serve-first 0x%s: its handler never finished before validBefore; dropped", escrow_id.hex())
            queued = self.store.settlements_due(BATCH_SIZE)
            if not queued:
                return
            wait = self.settle_batch_wait
            age = self.store.oldest_queued_age() or 0.0
            if len(queued) < BATCH_SIZE and age < wait and not force:
                return  # let more join this batch (settle_batch_wait is below any payment's time left)
            entries = {q.escrow_id: _settlement(q) for q in queued}
            ids = list(entries)
            try:
                receipt = self.chain.settle_many(list(entries.values()))
            except (EscrowError, OSError, TimeoutError) as exc:
                log.warning("settleMany of %d entries failed: %s", len(ids), exc)
                self.store.note_settle_attempt(ids, str(exc))
                report.errors.append(str(exc))
                return
            tx_hash = bytes(receipt["transactionHash"])
            report.settle_txs.append(tx_hash)
            outcomes = self.chain.settlements_in(receipt)
            paid = [e.id for e in outcomes if isinstance(e, Settled) and e.id in entries]
            self.store.mark_settled(paid, tx_hash)
            report.settled_first.extend(paid)
            for escrow_id in paid:
                log_sale(Sale.SETTLED, escrow_id, entries[escrow_id].terms, settle_tx=tx_hash)
            for skipped in (e for e in outcomes if isinstance(e, SettlementSkipped) and e.id in entries):
                terms = entries[skipped.id].terms
                self.store.mark_lost(skipped.id, skipped.reason.name.lower(), refuse_buyer=True, tx_hash=tx_hash)
                report.lost.append(skipped.id)
                log.error(
                    "settlement of 0x%s skipped (%s) in settleMany 0x%s: %d lost, buyer %s refused serve-first",
                    skipped.id.hex(), skipped.reason.name, tx_hash.hex(), terms.amount, terms.buyer,
                )  # fmt: skip
                log_sale(Sale.LOST, skipped.id, terms, settle_tx=tx_hash, reason=skipped.reason.name.lower())
            unanswered = [i for i in ids if i not in paid and i not in report.lost]
            if unanswered:  # no event for it: not expected of the contract; tried again next pass
                self.store.note_settle_attempt(unanswered, f"settleMany 0x{tx_hash.hex()} said nothing of it")
                return

    def _follow_settled(self, report: PostReport) -> None:
        """Settlements until they are deep enough: one a reorg took away is queued again (its authorization
        unused again, the stored signature settles it anew)."""
        depth = self.depth
        settled = self.store.settled_unfinal()
        if not settled:
            return
        head = self.chain.head().number
        final, again = [], []
        receipts: dict[bytes, TxReceipt | None] = {}
        for escrow_id, tx_hash in settled:
            if tx_hash not in receipts:
                receipts[tx_hash] = self.chain.receipt(tx_hash)
            receipt = receipts[tx_hash]
            if (
                receipt is not None
                and receipt["status"] == 1
                and any(isinstance(e, Settled) and e.id == escrow_id for e in self.chain.settlements_in(receipt))
            ):
                if head - int(receipt["blockNumber"]) + 1 >= depth:
                    final.append(escrow_id)
                continue
            payment = self.store.payment(escrow_id)
            if payment is not None and not self.chain.authorization_used(
                payment.terms.token, payment.terms.buyer, escrow_id
            ):
                again.append(escrow_id)
                log.warning("settlement of 0x%s vanished in a reorg; sending it again", escrow_id.hex())
            else:
                final.append(escrow_id)  # settled by another transaction: nothing left to follow
        if final:
            self.store.settle_final(final)
        if again:
            self.store.resettle(again, "its settlement vanished in a reorg")
        report.resettled.extend(again)

    def _retry_refunds(self, report: PostReport) -> None:
        for escrow_id, terms in self.store.refunds_pending():
            try:
                if self.chain.state_of(escrow_id) != State.HELD:
                    self.store.set_refunded(escrow_id, None)
                    continue
                receipt = self.chain.refund(terms)
            except (EscrowError, OSError, TimeoutError) as exc:
                log.warning("refund of 0x%s failed again: %s", escrow_id.hex(), exc)
                report.errors.append(str(exc))
                continue
            refund_tx = bytes(receipt["transactionHash"])
            self.store.set_refunded(escrow_id, refund_tx)
            report.refunded.append(escrow_id)
            log_sale(Sale.REFUNDED, escrow_id, terms, refund_tx=refund_tx)

    async def flush(self, *, force_settle: bool = False) -> PostReport:
        """One pass now, off the event loop (passes never overlap), then the seller's after-settle hooks for the
        serve-first settlements it recorded mined or lost, on the event loop."""
        report = await anyio.to_thread.run_sync(lambda: self.post_pending(force_settle=force_settle))
        await run_settled_hooks(self.hooks, self.store, [*report.settled_first, *report.lost], self.network)
        return report

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
            await self.flush(force_settle=True)
        # Hand the key's posting to another replica now rather than when the lease lapses.
        with contextlib.suppress(Exception):
            await anyio.to_thread.run_sync(self.store.release_lease, self.lease_name, self.owner)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()
