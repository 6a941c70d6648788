"""The buyer: an httpx client that pays delivery-escrow 402s, journals every payment, checks
what it receives against the seller's committed hash, and recovers after a crash.

    with EscrowClient(signer, rpc_url, "buyer.sqlite") as client:
        response = client.get("https://api.example/report/1")     # paid, hash-verified
    report = recover("buyer.sqlite", signer, rpc_url)              # in any later process

    httpx.Client(auth=EscrowAuth(signer, rpc_url, "buyer.sqlite"))  # for an existing client
    x402Client().register("eip155:84532", DeliveryEscrowScheme(signer, rpc_url, "buyer.sqlite"))

Every entry point (EscrowClient, AsyncEscrowClient, EscrowAuth, DeliveryEscrowScheme, the MCP
EscrowToolClient, recover) takes one `BuyerSettings` (signer, RPC URL, journal, policy, task,
validator, rpc_timeout, resend), or the signer, RPC URL and journal with those keywords:

    settings = BuyerSettings(signer, rpc_url, "buyer.sqlite", policy=Policy.from_toml("policy.toml"))
    with EscrowClient(settings, timeout=60) as client: ...
    recover(settings)

A payment takes five steps, each its own module: offer (the 402's option, bound to the request),
decide (the policy, pure; the ledger reserves the budget), sign (the offer checked against the chain,
fresh terms, the signature), journal (durable before the payment leaves), judge (the answer, pure: a
verdict the client applies once to the journal and raises from). One sans-IO flow (_flow.py) runs
them for the sync client, the async client, EscrowAuth and the MCP client alike.

Governance (DESIGN.md section 5): a declarative `Policy` (per-request maximum, deadline,
allowed networks, tokens, escrows, sellers and hosts; budgets overall, per task, per seller
and per time window) is decided before anything is signed; the amount is reserved in the
ledger (in the journal file) atomically with the budget check, spent on delivery, released
on refund or void; every decision and state change goes to the audit trail
(`<journal>.audit.jsonl` and `.audit.sqlite`), which never holds keys, signatures or
request contents. A `validator` (JSON schema or callable) checks delivered bodies.

On a 402 with a delivery-escrow option the client recomputes requestHash from the
request as it goes over the wire (method; scheme, Host header and raw target in canonical
form; body) and refuses an offer whose hash differs; builds terms (deadline = the next
block's time + maxTimeoutSeconds, fresh salt); asks the policy; signs the
ReceiveWithAuthorization (validBefore = deadline); commits the payment to the
journal; retries once with PAYMENT-SIGNATURE; and accepts the answer only if
keccak256(body) equals PAYMENT-RESPONSE's deliveryHash. A 503 of the seller's own
side (wire.Unavailable: chain_unavailable, operator_unfunded, deposit_pending, ...)
is answered by sending the same PAYMENT-SIGNATURE again after Retry-After, within a
`ResendPolicy` (capped wait, bounded count, never within its margin of validBefore),
each resend journaled; never by signing a new payment. Every chain call ends within
`rpc_timeout` seconds (escrow_py.chain.web3chain.connect_chain).

Before signing, the client checks that `extra.escrow` holds the genuine X402Escrow (its
runtime code hashes to the shipped contract's, or it is the shipped registry's deployment):
the token lets only that address redeem the signature, so a seller naming its own wallet or
a look-alike contract gets nothing signed.

Errors, each saying what happened to the money. Every failure out of the buyer API is one
of these (httpx's own errors pass through only for a request that carried no payment):

    EscrowError (escrow_py.protocol.errors)
    └── PaymentError               a paid request did not end in a verified delivery; `.escrow_id`
        ├── PaymentRefused         the client refused: nothing signed, no money moved; `.rule` is the
        │   │                      reason code (network_mismatch, deadline_too_far, token_domain_mismatch,
        │   │                      insufficient_balance, asset_not_erc3009, invalid_url,
        │   │                      invalid_requirements, invalid_payment_required, ...)
        │   ├── EscrowNotGenuine   rule escrow_not_genuine: extra.escrow is not X402Escrow; `.code`
        │   │                      (no_code: a wallet or empty address; other_code: another contract),
        │   │                      `.escrow`, `.chain_id`, `.code_hash`, `.expected`
        │   ├── ChainUnavailable   rule chain_unavailable: the RPC failed before signing (also a
        │   │                      ChainError); the typed chain error is its __cause__
        │   ├── RequestHashMismatch  the 402's requestHash is not this request's; `.expected`, `.offered`
        │   └── PolicyDenied       the spending policy said no: `.code` (Reason), `.reason`,
        │                          `.limit`, `.wanted`, `.available`
        ├── PaymentRejected        the seller refused the signed payment, not deposited when checked
        │                          (also after the last resend of a 503 operator_unfunded or
        │                          operator_nonce_conflict); recover() voids it after `.valid_before`
        ├── PaymentNotDelivered    deposited (or may be) but not delivered: held by `.escrow`, refundable
        │                          after `.deadline` by the keeper or recover(); also raised when the
        │                          chain cannot be read after the payment left, after the last resend
        │                          of a 503 deposit_pending, payment_in_progress or chain_unavailable
        │                          (a deposit may still land), and by EscrowClient when the
        │                          connection drops after the paid request left
        ├── DeliveryMismatch       the body's hash differs from the committed hash; `.committed`, `.received`
        ├── HandlerFailedRefunded  the seller's handler failed and it refunded; `.refund_tx`
        └── ResponseInvalid        delivered (held: settled, money spent; served first: `.settled`
                                   False) but the validator rejected the body; `.problem`, `.body`

Both settlement modes are paid (DESIGN.md section 8; `Policy(settlement=...)` may forbid one):
a `serve-first` delivery is returned like any other but journaled `unsettled`, its budget
reserved, until recover() sees its settlement on chain (delivered, spent) or its
authorization expire unused (void, released). A serve-first handler failure raises
PaymentRejected with reason `handler_failed_not_charged`: nothing was sent to the chain.

recover() raises a ChainError (RpcError) when it cannot read the chain; what it settled
before stays journaled. EscrowAuth cannot see a connection that fails after the paid
request left (httpx does not tell an Auth): `lost_in_flight(exc)` types it.
"""

from __future__ import annotations

from escrow_py.buyer._audit import AuditLog
from escrow_py.buyer._chain import delivered_hash
from escrow_py.buyer._client import AsyncEscrowClient, EscrowAuth, EscrowClient
from escrow_py.buyer._errors import (
    ChainUnavailable,
    DeliveryMismatch,
    EscrowNotGenuine,
    HandlerFailedRefunded,
    PaymentError,
    PaymentNotDelivered,
    PaymentRefused,
    PaymentRejected,
    PolicyDenied,
    RequestHashMismatch,
    ResponseInvalid,
)
from escrow_py.buyer._flow import lost_in_flight
from escrow_py.buyer._journal import Journal, JournalEntry, PaymentState
from escrow_py.buyer._ledger import LedgerRow, LedgerStatus
from escrow_py.buyer._policy import Decision, PaymentContext, Policy, Usage, WindowBudget
from escrow_py.buyer._recover import (
    RecoveryAction,
    RecoveryItem,
    RecoveryReport,
    arecover,
    reconcile_ledger,
    recover,
)
from escrow_py.buyer._sdk import DeliveryEscrowScheme
from escrow_py.buyer._settings import AllowAll, BuyerSettings, PaymentPolicy, ResendPolicy
from escrow_py.buyer._validate import TASK_EXTENSION, VALIDATOR_EXTENSION, Validator
from escrow_py.protocol.reasons import Reason

__all__ = [
    "TASK_EXTENSION",
    "VALIDATOR_EXTENSION",
    "AllowAll",
    "AsyncEscrowClient",
    "AuditLog",
    "BuyerSettings",
    "ChainUnavailable",
    "Decision",
    "DeliveryEscrowScheme",
    "DeliveryMismatch",
    "EscrowAuth",
    "EscrowClient",
    "EscrowNotGenuine",
    "HandlerFailedRefunded",
    "Journal",
    "JournalEntry",
    "LedgerRow",
    "LedgerStatus",
    "PaymentContext",
    "PaymentError",
    "PaymentNotDelivered",
    "PaymentPolicy",
    "PaymentRefused",
    "PaymentRejected",
    "PaymentState",
    "Policy",
    "PolicyDenied",
    "Reason",
    "RecoveryAction",
    "RecoveryItem",
    "RecoveryReport",
    "RequestHashMismatch",
    "ResendPolicy",
    "ResponseInvalid",
    "Usage",
    "Validator",
    "WindowBudget",
    "arecover",
    "delivered_hash",
    "lost_in_flight",
    "reconcile_ledger",
    "recover",
]
