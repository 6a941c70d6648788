"""What the facilitator does for a seller, apart from HTTP: verify, deposit, queue deliveries, refund.

It is the seller's chain side moved behind an API: the same off-chain and on-chain checks
(seller._verify), the same operator sender (seller._chain.seller_chain) and the same
durable queue and poster (seller._store, seller._poster), on the facilitator's own
database. Each escrow is recorded before its deposit leaves, so a replica that dies
mid-request leaves a row the next request for that payment finds.

Every method blocks (RPC and SQLite): the HTTP layer runs them in worker threads.
Errors a caller must see are `FacilitatorError`s with an HTTP status and a wire reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from web3.types import TxReceipt
from x402.schemas import (
    PaymentPayload,
    PaymentRequirements,
    SettleResponse,
    SupportedKind,
    SupportedResponse,
    VerifyResponse,
)

from escrow_py.chain import rpc
from escrow_py.chain.escrow import Settled as SettledEvent
from escrow_py.chain.port import EscrowChain
from escrow_py.chain.tx import SentTx
from escrow_py.console import Explorer
from escrow_py.facilitator._config import FacilitatorConfig
from escrow_py.facilitator._keys import ApiKey
from escrow_py.facilitator._ledger import Ledger
from escrow_py.facilitator._tables import NAMESPACE
from escrow_py.protocol.codec import to_hex
from escrow_py.protocol.errors import (
    EscrowError,
    InsufficientFunds,
    NonceConflict,
    ProtocolError,
    TransactionFailed,
    TransactionTimeout,
)
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import State
from escrow_py.protocol.wire import (
    SCHEME,
    EscrowPayload,
    EscrowRequirements,
    SettlementExtra,
    SettlementMode,
    SettlementStatus,
    encode_payment_signature,
)
from escrow_py.seller._chain import seller_chain
from escrow_py.seller._poster import DeliveryPoster, PostReport
from escrow_py.seller._sdk import CANCEL_KEY
from escrow_py.seller._store import Payment, PaymentStatus, SellerStore, SettlementRecord, SettleStatus, StoredResponse
from escrow_py.seller._verify import Refusal, VerifiedPayment, verify_offchain, verify_onchain

log = logging.getLogger("escrow_py.facilitator")

# The facilitator stores no response body (the seller keeps it); its rows carry this placeholder.
_NO_BODY = StoredResponse(200, [], b"")
RETRY_AFTER = 2
# How long a copy of a payment waits for the request holding it before answering 503 payment_in_progress.
CLAIM_WAIT = 10.0
# The facilitator puts no exposure limit of its own on serve-first: the seller, who carries the risk, sets its own.
_NO_LIMIT = 2**255


class FacilitatorError(EscrowError):
    """A refusal with an HTTP status: 403 not the caller's escrow, 404 unknown, 409 conflict, 503 try again."""

    def __init__(self, status: int, reason: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Settled:
    """The deposit of one payment: its tx (None if someone else deposited it) and the chain time it was judged at."""

    verified: VerifiedPayment
    deposit_tx: bytes | None
    accepted_at: int


class Facilitator:
    def __init__(self, config: FacilitatorConfig, chain: EscrowChain | None = None) -> None:
        self.config = config
        settings = config.chain_settings()
        self.store = SellerStore(config.store, namespace=NAMESPACE)
        # The store is the operator key's nonce book: replicas on one database never collide on a nonce.
        self.chain: EscrowChain = chain or seller_chain(settings, book=self.store)
        self.ledger = Ledger(config.store)
        self.replica = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        # One poster at a time per operator key, whichever replica: a lease in the database.
        self.poster = DeliveryPoster.of(settings, self.chain, self.store, owner=self.replica)
        # A /deliver batch is queued whole before this process's poster looks at the queue again, so
        # deliveries sent together leave in one deliverMany (the store queues one row per commit).
        self._queueing = threading.Lock()
        # Writes that need not delay the answer (one SQLite commit is ~7 ms here): a payment claim given back
        # (a dead replica's claim lapses by itself anyway) and the ledger row of a deposit (bookkeeping for
        # the console: the deposit itself is recorded in the store before the answer leaves).
        self._after = ThreadPoolExecutor(max_workers=1, thread_name_prefix="facilitator-after")
        # Where the console links transactions: by the chain id, unless the node is a development node.
        self.explorer = Explorer(config.chain_id, lambda: self.chain.request("web3_clientVersion", []),
                                 configured=config.explorer_url)  # fmt: skip

    def close(self) -> None:
        self._after.shutdown(wait=True)
        self.store.close()
        self.ledger.close()

    def _later(self, what: str, fn: Callable[[], None]) -> None:
        def run() -> None:
            try:
                fn()
            except (EscrowError, OSError) as exc:
                log.warning("%s failed: %s", what, exc)

        self._after.submit(run)

    # -- /supported --------------------------------------------------------------------------

    def supported(self) -> SupportedResponse:
        config = self.config
        extra = {
            "escrow": config.escrow,
            "operator": config.operator.address,
            "asset": config.token,
            "name": config.token_name,
            "version": config.token_version,
            "settlement": [SettlementMode.HOLD, SettlementMode.SERVE_FIRST],
        }
        kind = SupportedKind(x402_version=2, scheme=SCHEME, network=config.network, extra=extra)
        return SupportedResponse(kinds=[kind], extensions=[], signers={"eip155:*": [config.operator.address]})

    # -- /verify and /settle -----------------------------------------------------------------

    def _offer(self, requirements: PaymentRequirements, key: ApiKey) -> EscrowRequirements:
        """The seller's requirements, checked against this facilitator and against what the key owns."""
        try:
            offer = EscrowRequirements.from_model(requirements)
        except ProtocolError as exc:
            raise Refusal(exc.reason, str(exc)) from None
        config = self.config
        if offer.pay_to not in key.pay_to:
            raise FacilitatorError(403, Reason.NOT_YOUR_PAY_TO, f"payTo {offer.pay_to} is not one of this API key's")
        checks = (
            (offer.network == config.network, Reason.NETWORK_MISMATCH, f"network {offer.network}"),
            (offer.asset == config.token, Reason.ASSET_MISMATCH, f"asset {offer.asset}, served: {config.token}"),
            (offer.extra.escrow == config.escrow, Reason.ESCROW_MISMATCH, f"escrow {offer.extra.escrow}"),
            (
                offer.extra.operator == config.operator.address,
                Reason.OPERATOR_MISMATCH,
                f"operator {offer.extra.operator}, this facilitator's is {config.operator.address}",
            ),
            (
                (offer.extra.name, offer.extra.version) == (config.token_name, config.token_version),
                Reason.REQUIREMENTS_MISMATCH,
                f"EIP-712 domain {offer.extra.name}/{offer.extra.version}",
            ),
        )
        for ok, reason, message in checks:
            if not ok:
                raise Refusal(reason, message)
        return offer

    def _verified(
        self, payload: PaymentPayload, requirements: PaymentRequirements, key: ApiKey, chain_time: int
    ) -> VerifiedPayment:
        offer = self._offer(requirements, key)
        return verify_offchain(
            encode_payment_signature(payload),
            offer,
            chain_time=chain_time,
            min_time_left=self.config.min_time_left,
            deadline_slack=self.config.deadline_slack,
        )

    def verify(self, payload: PaymentPayload, requirements: PaymentRequirements, key: ApiKey) -> VerifyResponse:
        """Everything a deposit (hold) or a settlement (serve-first) checks before it is sent, including its
        simulation; nothing is recorded."""
        try:
            verified = self._verified(payload, requirements, key, self._now())
            chain = self.chain
            verify_onchain(verified, chain=chain,
                           serve_first=_settlement_mode(requirements) == SettlementMode.SERVE_FIRST)  # fmt: skip
        except Refusal as rejected:
            return VerifyResponse(is_valid=False, invalid_reason=rejected.error, invalid_message=str(rejected))
        except FacilitatorError:
            raise  # not this key's payTo (403), the chain's clock unreadable (503): already the right answer
        except (EscrowError, OSError) as exc:
            raise self._chain_down(exc) from None
        return VerifyResponse(is_valid=True, payer=verified.buyer)

    def settle(self, payload: PaymentPayload, requirements: PaymentRequirements, key: ApiKey) -> SettleResponse:
        """Hold: deposit the payment. Serve-first: queue its settlement (settleMany) with the delivery hash the
        payload carries. Idempotent by escrow id: the same payment again answers the same deposit or settlement."""
        network = self.config.network
        try:
            mode = _settlement_mode(requirements)
        except ProtocolError as exc:
            return SettleResponse(success=False, error_reason=exc.reason, error_message=str(exc), transaction="",
                                  network=network)  # fmt: skip
        if mode == SettlementMode.SERVE_FIRST:
            return self._settle_first(payload, requirements, key)
        if payload.payload.get(CANCEL_KEY) is not None:
            return self._cancel(payload, requirements, key)
        try:
            hashed = _delivery_hash_of(payload, required=False)
            settled = self._settle(payload, requirements, key)
        except Refusal as rejected:
            return SettleResponse(
                success=False,
                error_reason=rejected.error,
                error_message=str(rejected),
                transaction="",
                network=network,
            )
        verified = settled.verified
        extra: dict[str, object] = {
            "escrowId": "0x" + verified.escrow_id.hex(),
            "deadline": verified.terms.deadline,
            "settlement": "held",
            "acceptedAt": settled.accepted_at,
        }
        if hashed is not None:
            # The SDK's `escrow` flow settles again after the handler with the delivery hash: queue the delivery.
            self.deliver([(verified.escrow_id, hashed)], key)
            extra["deliveryHash"] = "0x" + hashed.hex()
        return SettleResponse(
            success=True,
            payer=verified.buyer,
            transaction="0x" + settled.deposit_tx.hex() if settled.deposit_tx else "",
            network=network,
            amount=str(verified.terms.amount),
            extra=extra,
        )

    def _cancel(self, payload: PaymentPayload, requirements: PaymentRequirements, key: ApiKey) -> SettleResponse:
        """The SDK's cancel-phase settle (the handler failed after the deposit): refund it, as /refund does.
        Only for a payment deposited here, presented again with the signature it was deposited with."""
        network = self.config.network
        try:
            offer = self._offer(requirements, key)
            escrow_id = self._claimed_id(payload, offer)
            payment = self._owned(escrow_id, key)
            self._verified(payload, requirements, key, payment.accepted_at)  # the same signed payment
        except Refusal as rejected:
            return SettleResponse(success=False, error_reason=rejected.error, error_message=str(rejected),
                                  transaction="", network=network)  # fmt: skip
        answer = self.refund(escrow_id, key)
        refund_tx = answer["transaction"]
        extra = SettlementExtra(
            escrow_id=escrow_id, deadline=payment.terms.deadline,
            state=State.REFUNDED if answer["state"] == "refunded" else State.HELD,
            refund_transaction=bytes.fromhex(refund_tx[2:]) if refund_tx else None,
        )  # fmt: skip
        return SettleResponse(success=True, payer=payment.terms.buyer, transaction=refund_tx or "", network=network,
                              amount="0", extra=extra.to_json())  # fmt: skip

    def _settle_first(self, payload: PaymentPayload, requirements: PaymentRequirements, key: ApiKey) -> SettleResponse:
        network = self.config.network
        try:
            escrow_id, hashed, record = self._queue_settlement(payload, requirements, key)
        except Refusal as rejected:
            return SettleResponse(success=False, error_reason=rejected.error, error_message=str(rejected),
                                  transaction="", network=network)  # fmt: skip
        payment = self.store.payment(escrow_id)
        assert payment is not None  # recorded with its settlement, and never removed once queued
        extra: dict[str, object] = {
            "escrowId": "0x" + escrow_id.hex(),
            "deadline": payment.terms.deadline,
            "deliveryHash": "0x" + hashed.hex(),
            "acceptedAt": payment.accepted_at,
        }
        if record.status == SettleStatus.LOST:
            return SettleResponse(success=False, error_reason=Reason.SETTLEMENT_FAILED,
                                  error_message=f"the settlement was not paid: {record.reason}",
                                  transaction=to_hex(record.tx_hash) or "", network=network, extra=extra)  # fmt: skip
        settled = record.status == SettleStatus.SETTLED
        extra["settlement"] = SettlementStatus.SETTLED if settled else SettlementStatus.PENDING
        return SettleResponse(
            success=True,
            payer=payment.terms.buyer,
            transaction=to_hex(record.tx_hash) or "" if settled else "",
            network=network,
            amount=str(payment.terms.amount),
            extra=extra,
        )

    def _queue_settlement(
        self, payload: PaymentPayload, requirements: PaymentRequirements, key: ApiKey
    ) -> tuple[bytes, bytes, SettlementRecord]:
        """Record a served serve-first payment and queue its settlement; the record already there, if any.

        The poster sends it in a settleMany batch. The payment was checked as /verify checks it (the
        simulation of the pull included); whoever asks again for the same escrow id gets the same
        settlement, and a different delivery hash for it is refused (409), never queued.
        """
        offer = self._offer(requirements, key)
        escrow_id = self._claimed_id(payload, offer)
        hashed = _delivery_hash_of(payload, required=True)
        assert hashed is not None
        known = self._known_settlement(payload, requirements, key, escrow_id, hashed)
        if known is not None:  # the seller following its settlement: answered from the store, nothing written
            return escrow_id, hashed, known
        with self._claim(escrow_id):
            record = self.store.settlement(escrow_id)
            payment = self.store.payment(escrow_id)
            if payment is not None and record is None:
                raise Refusal(Reason.ESCROW_SETTLED, f"escrow 0x{escrow_id.hex()} was accepted in hold")
            if payment is not None and record is not None:
                self._verified(payload, requirements, key, payment.accepted_at)  # the same signed payment
                if record.delivery_hash is not None and record.delivery_hash != hashed:
                    raise FacilitatorError(409, "delivery_conflict", f"escrow 0x{escrow_id.hex()} is settling "
                                           f"with delivery hash 0x{record.delivery_hash.hex()}")  # fmt: skip
                if record.delivery_hash is None:  # recorded by a replica that died before queueing it
                    self.store.save_served_first(escrow_id, _NO_BODY, hashed)
                    record = self.store.settlement(escrow_id)
                    assert record is not None
                return escrow_id, hashed, record
            now = self._now()
            verified = self._verified(payload, requirements, key, now)
            chain = self.chain
            try:
                verify_onchain(verified, chain=chain, serve_first=True)
            except Refusal:
                raise
            except (EscrowError, OSError) as exc:
                raise self._chain_down(exc) from None
            terms = verified.terms
            # The seller carries the risk of serving first and bounds it itself; the facilitator still
            # refuses a buyer who left a settlement unpaid (its `refused_buyers`).
            refused = self.store.begin_serve_first(
                escrow_id, terms, accepted_at=now, route=_route(key), payload=json.dumps(verified.payload.to_json()),
                due=min(verified.payload.authorization.valid_before, terms.deadline),
                max_per_buyer=_NO_LIMIT, max_total=_NO_LIMIT,
            )  # fmt: skip
            if refused is not None:
                raise Refusal(Reason(refused), f"buyer {terms.buyer} left a serve-first settlement unpaid")
            self.store.save_served_first(escrow_id, _NO_BODY, hashed)
            record = self.store.settlement(escrow_id)
            assert record is not None
            return escrow_id, hashed, record

    def _known_settlement(
        self, payload: PaymentPayload, requirements: PaymentRequirements, key: ApiKey, escrow_id: bytes, hashed: bytes
    ) -> SettlementRecord | None:
        """The settlement queued for this payment with this delivery hash, if it is (the signature checked again:
        only the signed payment learns where its settlement stands); 409 for another hash."""
        record = self.store.settlement(escrow_id)
        payment = self.store.payment(escrow_id) if record is not None else None
        if record is None or record.delivery_hash is None or payment is None:
            return None
        self._verified(payload, requirements, key, payment.accepted_at)
        if record.delivery_hash != hashed:
            raise FacilitatorError(409, "delivery_conflict", f"escrow 0x{escrow_id.hex()} is settling with "
                                   f"delivery hash 0x{record.delivery_hash.hex()}")  # fmt: skip
        return record

    @contextlib.contextmanager
    def _claim(self, escrow_id: bytes) -> Iterator[None]:
        """One request on a payment at a time across replicas: a lease row in the database.

        The lease outlasts the longest a deposit may take (tx_timeout and a margin), so it needs
        no renewal; a replica that dies holding it leaves it to lapse, and the next request
        finds the payment's row where the dead one left it.
        """
        name, owner = f"payment:0x{escrow_id.hex()}", f"{self.replica}:{secrets.token_hex(4)}"
        seconds = self.config.tx_timeout + 2 * self.config.rpc_timeout + 5
        give_up, pause = time.monotonic() + CLAIM_WAIT, 0.02
        while not self.store.take_lease(name, owner, seconds):
            if time.monotonic() > give_up:
                raise FacilitatorError(503, Reason.PAYMENT_IN_PROGRESS, "this payment is being settled; send it again",
                                       retry_after=1)  # fmt: skip
            time.sleep(pause)
            pause = min(pause * 2, 0.25)
        try:
            yield
        finally:
            self._later(f"release of claim {name}", lambda: self.store.release_lease(name, owner))

    def _settle(self, payload: PaymentPayload, requirements: PaymentRequirements, key: ApiKey) -> Settled:
        offer = self._offer(requirements, key)  # before anything: a key acts only on its own payTo
        escrow_id = self._claimed_id(payload, offer)
        with self._claim(escrow_id):
            payment = self.store.payment(escrow_id)
            if payment is not None and payment.serve_first:
                raise Refusal(Reason.ESCROW_SETTLED, f"escrow 0x{escrow_id.hex()} was accepted serve-first")
            if payment is not None and payment.status != PaymentStatus.DEPOSITING:
                verified = self._verified(payload, requirements, key, payment.accepted_at)
                return Settled(verified, payment.deposit_tx, payment.accepted_at)
            state, now = self._state_and_time(escrow_id)
            if payment is not None and state == State.NONE and payment.deposit_tx is not None:
                receipt = self._resume(payment)
                if receipt is not None:
                    verified = self._verified(payload, requirements, key, payment.accepted_at)
                    return Settled(verified, bytes(receipt["transactionHash"]), payment.accepted_at)
                state = self.chain.state_of(escrow_id)
            if state == State.HELD:
                # Deposited by another request or by the buyer: the token checked the signature then.
                reference = payment.accepted_at if payment is not None else now
                verified = self._verified(payload, requirements, key, reference)
                if payment is None:
                    self.store.begin_deposit(escrow_id, verified.terms, reference, _route(key))
                self.store.set_held(escrow_id, None)
                return Settled(verified, None, reference)
            if state != State.NONE:
                raise Refusal(Reason.ESCROW_SETTLED, f"escrow 0x{escrow_id.hex()} is {state.name}")
            verified = self._verified(payload, requirements, key, now)
            return Settled(verified, self._deposit(verified, now, fresh=payment is None, route=_route(key)), now)

    def _claimed_id(self, payload: PaymentPayload, offer: EscrowRequirements) -> bytes:
        try:
            terms = EscrowPayload.from_json(payload.payload).terms
        except ProtocolError as exc:
            raise Refusal(exc.reason, str(exc)) from None
        return terms.escrow_id(offer.chain_id, offer.extra.escrow)

    def _state_and_time(self, escrow_id: bytes) -> tuple[State, int]:
        try:
            return rpc.both(lambda: self.chain.state_of(escrow_id), self.chain.next_block_time)  # one round trip
        except (EscrowError, OSError) as exc:
            raise self._chain_down(exc) from None

    def _now(self) -> int:
        try:
            return self.chain.next_block_time()
        except (EscrowError, OSError) as exc:
            raise self._chain_down(exc) from None

    @staticmethod
    def _chain_down(exc: Exception) -> FacilitatorError:
        log.warning("chain call failed: %s", exc)
        return FacilitatorError(503, Reason.CHAIN_UNAVAILABLE, "the chain node failed", retry_after=RETRY_AFTER)

    def _resume(self, payment: Payment) -> TxReceipt | None:
        assert payment.deposit_tx is not None
        try:
            return self.chain.resume(payment.deposit_tx)
        except TransactionTimeout:
            raise FacilitatorError(
                503, Reason.DEPOSIT_PENDING, "the deposit is not confirmed yet", retry_after=RETRY_AFTER
            ) from None
        except TransactionFailed:
            return None

    def _deposit(self, verified: VerifiedPayment, now: int, *, fresh: bool, route: str) -> bytes | None:
        escrow_id, chain = verified.escrow_id, self.chain
        try:
            gas = verify_onchain(verified, chain=chain)
        except (EscrowError, OSError) as exc:
            if isinstance(exc, Refusal):
                raise
            raise self._chain_down(exc) from None
        if fresh:
            self.store.begin_deposit(escrow_id, verified.terms, now, route)

        def record(signed: SentTx) -> None:
            self.store.set_deposit_sent(escrow_id, signed.tx_hash)

        try:
            receipt = chain.deposit(verified.payload, gas=gas, on_signed=record)
        except TransactionTimeout:
            raise FacilitatorError(
                503, Reason.DEPOSIT_PENDING, "the deposit was sent and is not confirmed yet", retry_after=RETRY_AFTER
            ) from None
        except TransactionFailed as exc:
            if chain.state_of(escrow_id) == State.HELD:
                self.store.set_held(escrow_id, None)
                return None
            self.store.forget(escrow_id)
            raise Refusal(Reason.DEPOSIT_FAILED, str(exc), detail=exc.reason) from None
        except (InsufficientFunds, NonceConflict) as exc:
            self.store.forget(escrow_id)
            reason = Reason.OPERATOR_UNFUNDED if isinstance(exc, InsufficientFunds) else Reason.NONCE_CONFLICT
            log.error("deposit of 0x%s not sent: %s", escrow_id.hex(), exc)
            raise FacilitatorError(503, reason, "the operator cannot send now", retry_after=30) from None
        except (EscrowError, OSError) as exc:
            if chain.state_of(escrow_id) == State.HELD:
                self.store.set_held(escrow_id, None)
                return None
            self.store.forget(escrow_id)
            raise self._chain_down(exc) from None
        tx_hash = bytes(receipt["transactionHash"])
        self.store.set_held(escrow_id, tx_hash)
        amount = verified.terms.amount
        self._later("ledger row", lambda: self.ledger.record_tx("deposit", tx_hash, receipt, [escrow_id], amount))
        return tx_hash

    # -- /deliver, /refund, /escrows ---------------------------------------------------------

    def _owned(self, escrow_id: bytes, key: ApiKey) -> Payment:
        payment = self.store.payment(escrow_id)
        if payment is None:
            raise FacilitatorError(404, Reason.UNKNOWN_ESCROW, f"escrow 0x{escrow_id.hex()} was not settled here")
        if payment.terms.seller not in key.pay_to:
            # Same answer as unknown would leak less, but a seller needs to see it acted on a foreign id.
            raise FacilitatorError(403, Reason.NOT_YOUR_ESCROW, f"escrow 0x{escrow_id.hex()} is not this API key's")
        return payment

    def deliver(self, entries: list[tuple[bytes, bytes]], key: ApiKey) -> list[dict[str, str]]:
        """Queue delivery hashes (posted by the poster in deliverMany batches). All or nothing: every
        entry is checked before any is queued."""
        payments: list[tuple[Payment, bytes]] = []
        for escrow_id, hashed in entries:
            payment = self._owned(escrow_id, key)
            if payment.serve_first:
                raise FacilitatorError(409, "serve_first", f"escrow 0x{escrow_id.hex()} settles serve-first: its "
                                       "delivery hash goes with its /settle")  # fmt: skip
            if payment.status in (PaymentStatus.REFUNDED, PaymentStatus.REFUND_PENDING):
                raise FacilitatorError(409, Reason.ESCROW_SETTLED, f"escrow 0x{escrow_id.hex()} is being refunded")
            if payment.status == PaymentStatus.DEPOSITING:
                raise FacilitatorError(409, Reason.NOT_DEPOSITED, f"escrow 0x{escrow_id.hex()} is not deposited yet")
            record = self.store.delivery(escrow_id)
            if record is not None and record.delivery_hash != hashed:
                raise FacilitatorError(
                    409,
                    Reason.DELIVERY_CONFLICT,
                    f"escrow 0x{escrow_id.hex()} already has delivery hash 0x{record.delivery_hash.hex()}",
                )
            payments.append((payment, hashed))
        answers = []
        with self._queueing:
            for payment, hashed in payments:
                if payment.status == PaymentStatus.HELD:
                    self.store.save_served(payment.escrow_id, payment.terms, _NO_BODY, hashed)
        for payment, _hashed in payments:
            record = self.store.delivery(payment.escrow_id)
            answers.append(
                {
                    "escrowId": "0x" + payment.escrow_id.hex(),
                    "status": record.status if record else PaymentStatus.SERVED,
                }
            )
        return answers

    def refund(self, escrow_id: bytes, key: ApiKey) -> dict[str, str | None]:
        """Refund now (the seller's handler failed); a refund that cannot be sent now is retried by the poster."""
        with self._claim(escrow_id):
            payment = self._owned(escrow_id, key)
            if payment.serve_first:  # nothing was deposited: a failed handler is simply never settled
                raise FacilitatorError(409, "serve_first", f"escrow 0x{escrow_id.hex()} holds no deposit to refund")
            if payment.status == PaymentStatus.REFUNDED:
                return {
                    "escrowId": "0x" + escrow_id.hex(),
                    "state": "refunded",
                    "transaction": to_hex(payment.refund_tx),
                }
            if payment.status == PaymentStatus.SERVED:
                raise FacilitatorError(
                    409, Reason.ALREADY_DELIVERED, f"escrow 0x{escrow_id.hex()} has a delivery queued"
                )
            if payment.status == PaymentStatus.DEPOSITING:
                raise FacilitatorError(409, Reason.NOT_DEPOSITED, f"escrow 0x{escrow_id.hex()} is not deposited yet")
            refund_tx: bytes | None = None
            try:
                if self.chain.state_of(escrow_id) == State.HELD:
                    receipt = self.chain.refund(payment.terms)
                    refund_tx = bytes(receipt["transactionHash"])
                    self.ledger.record_tx("refund", refund_tx, receipt, [escrow_id], payment.terms.amount)
            except (EscrowError, OSError) as exc:
                log.warning("refund of 0x%s failed, the poster retries it: %s", escrow_id.hex(), exc)
                self.store.save_failed(escrow_id, _NO_BODY, None)
                return {"escrowId": "0x" + escrow_id.hex(), "state": "refund_pending", "transaction": None}
            self.store.save_failed(escrow_id, _NO_BODY, refund_tx)
            if refund_tx is None:
                self.store.set_refunded(escrow_id, None)
            return {"escrowId": "0x" + escrow_id.hex(), "state": "refunded", "transaction": to_hex(refund_tx)}

    def escrow(self, escrow_id: bytes, key: ApiKey) -> dict[str, object]:
        payment = self._owned(escrow_id, key)
        record = self.store.delivery(escrow_id)
        settlement = self.store.settlement(escrow_id)
        return {
            "settlement": None
            if settlement is None
            else {
                "status": settlement.status,
                "deliveryHash": to_hex(settlement.delivery_hash),
                "transaction": to_hex(settlement.tx_hash),
                "reason": settlement.reason,
            },
            "escrowId": "0x" + escrow_id.hex(),
            "status": payment.status,
            "terms": payment.terms.to_json(),
            "depositTransaction": to_hex(payment.deposit_tx),
            "refundTransaction": to_hex(payment.refund_tx),
            "delivery": None
            if record is None
            else {
                "status": record.status,
                "deliveryHash": "0x" + record.delivery_hash.hex(),
                "transaction": to_hex(record.tx_hash),
            },
        }

    # -- the poster --------------------------------------------------------------------------

    def post_pending(self) -> PostReport:
        """One poster pass; its deliverMany's gas goes in the ledger."""
        with self._queueing:
            report = self.poster.post_pending()
        if report.tx_hash is not None and report.posted:
            receipt = self.chain.receipt(report.tx_hash)
            if receipt is not None:
                amount = self.ledger.amount_of(report.posted)
                self.ledger.record_tx("deliver", report.tx_hash, receipt, report.posted, amount)
        for tx_hash in report.settle_txs:  # serve-first settleMany batches: what they paid, what they cost
            receipt = self.chain.receipt(tx_hash)
            if receipt is not None:
                paid = [s.id for s in self.chain.settlements_in(receipt) if isinstance(s, SettledEvent)]
                self.ledger.record_tx("settle", tx_hash, receipt, paid, self.ledger.amount_of(paid))
        return report


def _settlement_mode(requirements: PaymentRequirements) -> SettlementMode:
    value = (requirements.extra or {}).get("settlement", SettlementMode.HOLD)
    try:
        return SettlementMode(value)
    except ValueError:
        raise ProtocolError(Reason.INVALID_PAYLOAD, f"extra.settlement {value!r} is not hold or serve-first") from None


def _delivery_hash_of(payload: PaymentPayload, *, required: bool) -> bytes | None:
    """The hash of the bytes the seller served, which a serve-first settlement (or, in hold, the delivery
    queued by an after-handler settle) commits on chain; None if absent and not `required`.

    It rides in the payload itself (`payload.deliveryHash`), where the SDK's resource server lets a
    scheme add it to its after-handler settle (`enrich_settlement_payload`).
    """
    value = payload.payload.get("deliveryHash")
    if value is None and not required:
        return None
    if not isinstance(value, str) or re.fullmatch(r"0x[0-9a-fA-F]{64}", value) is None:
        raise Refusal(
            Reason.INVALID_PAYLOAD,
            f"a serve-first settlement needs payload.deliveryHash (0x and 64 hex digits, the hash of the bytes "
            f"served), got {value!r}",
        )
    hashed = bytes.fromhex(value[2:])
    if hashed == bytes(32):
        raise Refusal(Reason.INVALID_PAYLOAD, "payload.deliveryHash is zero: the contract refuses it")
    return hashed


def _route(key: ApiKey) -> str:
    """The `route` column of the shared store: which seller key the payment came through."""
    return f"key:{key.key_id}"


__all__ = ["Facilitator", "FacilitatorError", "Settled"]
