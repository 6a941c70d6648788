"""The buyer: an httpx client that pays delivery-escrow 402s, journals every payment, checks
what it receives against the seller's committed hash, and recovers after a crash.

    with EscrowClient(signer, rpc_url, "buyer.sqlite") as client:
        response = client.get("https://api.example/report/1")     # paid, hash-verified
    report = recover("buyer.sqlite", signer, rpc_url)              # in any later process

    httpx.Client(auth=EscrowAuth(signer, rpc_url, "buyer.sqlite"))  # for an existing client
    x402Client().register("eip155:84532", DeliveryEscrowScheme(signer, rpc_url, "buyer.sqlite"))

On a 402 with a delivery-escrow option the client recomputes requestHash from the
request (method, URL, body) and refuses an offer whose hash differs; builds terms
(deadline = chain time + maxTimeoutSeconds, fresh salt); asks the policy; signs the
ReceiveWithAuthorization (validBefore = deadline); commits the payment to the
journal; retries once with PAYMENT-SIGNATURE; and accepts the answer only if
keccak256(body) equals PAYMENT-RESPONSE's deliveryHash.

Errors, each saying what happened to the money:

    EscrowError (escrow_py.errors)
    └── PaymentError               a paid request did not end in a verified delivery; `.escrow_id`
        ├── PaymentRefused         the client refused: nothing signed, no money moved; `.rule`
        │   ├── RequestHashMismatch  the 402's requestHash is not this request's; `.expected`, `.offered`
        │   └── PolicyDenied       the spending policy said no; `.reason`
        ├── PaymentRejected        the seller refused the signed payment, not deposited when checked;
        │                          recover() voids it after `.valid_before`
        ├── PaymentNotDelivered    deposited (or may be) but not delivered: held, refundable after
        │                          `.deadline` by the keeper or recover(); also what EscrowClient
        │                          raises when the connection drops after the paid request left
        ├── DeliveryMismatch       the body's hash differs from the committed hash; `.committed`, `.received`
        └── HandlerFailedRefunded  the seller's handler failed and it refunded; `.refund_tx`

Also raised: ProtocolError from the SDK plugin for malformed requirements, ChainError
when the RPC fails before anything is signed.
"""

from __future__ import annotations

from escrow_py.buyer._client import AsyncEscrowClient, EscrowAuth, EscrowClient, lost_in_flight
from escrow_py.buyer._core import AllowAll, PaymentPolicy
from escrow_py.buyer._errors import (
    DeliveryMismatch,
    HandlerFailedRefunded,
    PaymentError,
    PaymentNotDelivered,
    PaymentRefused,
    PaymentRejected,
    PolicyDenied,
    RequestHashMismatch,
)
from escrow_py.buyer._journal import Journal, JournalEntry, PaymentState
from escrow_py.buyer._recover import Action, RecoveryItem, RecoveryReport, arecover, delivered_hash, recover
from escrow_py.buyer._sdk import DeliveryEscrowScheme

__all__ = [
    "Action",
    "AllowAll",
    "AsyncEscrowClient",
    "DeliveryEscrowScheme",
    "DeliveryMismatch",
    "EscrowAuth",
    "EscrowClient",
    "HandlerFailedRefunded",
    "Journal",
    "JournalEntry",
    "PaymentError",
    "PaymentNotDelivered",
    "PaymentPolicy",
    "PaymentRefused",
    "PaymentRejected",
    "PaymentState",
    "PolicyDenied",
    "RecoveryItem",
    "RecoveryReport",
    "RequestHashMismatch",
    "arecover",
    "delivered_hash",
    "lost_in_flight",
    "recover",
]
