"""Why a payment was refused, in one vocabulary: the reasons every part of the package gives.

The values are stable strings: they go over the wire (the seller's 402 `error` and 503 body, a
ProtocolError's `.reason`, the facilitator's `error`), into the buyer's exceptions (`.rule`,
`.code`), journal and audit log, and into metrics labels. One enum, so that one concept has one
spelling wherever it is judged: `deadline_too_far` is the same member whether the seller's rules
or the buyer's policy found it.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Machine-readable reasons (x402's and the x402 `escrow` scheme's names where one fits)."""

    # -- the seller's rules: a payment refused with 400 or 402 (Refusal), or a header that does not decode

    INVALID_PAYLOAD = "invalid_payload"
    HEADER_TOO_LARGE = "header_too_large"
    UNSUPPORTED_VERSION = "unsupported_x402_version"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    REQUIREMENTS_MISMATCH = "requirements_mismatch"
    NETWORK_MISMATCH = "network_mismatch"
    ASSET_MISMATCH = "asset_mismatch"
    RECEIVER_MISMATCH = "receiver_mismatch"
    ESCROW_MISMATCH = "escrow_mismatch"
    OPERATOR_MISMATCH = "operator_mismatch"
    AMOUNT_MISMATCH = "amount_mismatch"
    REQUEST_HASH_MISMATCH = "request_hash_mismatch"
    TERMS_MISMATCH = "terms_mismatch"
    NONCE_MISMATCH = "nonce_mismatch"
    INVALID_SIGNATURE = "invalid_escrow_signature"
    AUTHORIZATION_EXPIRED = "authorization_expired"
    AUTHORIZATION_NOT_YET_VALID = "authorization_not_yet_valid"
    AUTHORIZATION_USED = "authorization_used"
    DEADLINE_TOO_SOON = "deadline_too_soon"
    DEADLINE_TOO_FAR = "deadline_too_far"
    INSUFFICIENT_BALANCE = "insufficient_balance"
    SIMULATION_FAILED = "simulation_failed"
    DEPOSIT_FAILED = "deposit_failed"
    ESCROW_REFUNDABLE = "escrow_refundable"
    ESCROW_SETTLED = "escrow_settled"
    HANDLER_FAILED_REFUNDED = "handler_failed_refunded"
    # Serve-first: the handler failed before anything moved; the authorization was never used.
    HANDLER_FAILED_NOT_CHARGED = "handler_failed_not_charged"
    # Serve-first refused on a route that does not fall back to hold: an exposure limit is reached,
    # or this buyer left a serve-first settlement unpaid before.
    SERVE_FIRST_LIMIT = "serve_first_limit"
    SERVE_FIRST_REFUSED = "serve_first_refused"
    SETTLEMENT_FAILED = "settlement_failed"  # served first, and the settlement was skipped or expired: unpaid
    # -- the seller's own side failed, not the payment: 503 with Retry-After; send the same payment again
    CHAIN_UNAVAILABLE = "chain_unavailable"  # the node is down, hung or refused (the seller's, or the buyer's)
    OPERATOR_UNFUNDED = "operator_unfunded"  # the seller's operator key cannot pay for gas
    NONCE_CONFLICT = "operator_nonce_conflict"  # the operator key's nonce was taken elsewhere, even after a resync
    DEPOSIT_PENDING = "deposit_pending"  # the deposit was sent and is not confirmed yet (it may still land)
    PAYMENT_IN_PROGRESS = "payment_in_progress"  # another request or replica is handling this payment now
    FACILITATOR_UNAVAILABLE = "facilitator_unavailable"  # the seller's facilitator is down, slow or refused it
    SELLER_HOOK_FAILED = "seller_hook_failed"  # a verify/settle hook of the seller's raised: nothing was charged

    # -- the buyer refuses to pay (PaymentRefused.rule): nothing signed, no money moved
    INVALID_PAYMENT_REQUIRED = "invalid_payment_required"  # the 402's PAYMENT-REQUIRED does not decode
    INVALID_REQUIREMENTS = "invalid_requirements"  # the delivery-escrow entry of `accepts` does not decode
    INVALID_PAYMENT_RESPONSE = "invalid_payment_response"  # a PAYMENT-RESPONSE (or its MCP form) does not decode
    INVALID_URL = "invalid_url"  # the request's URL has no canonical form
    ASSET_NOT_ERC3009 = "asset_not_erc3009"  # the token cannot take a ReceiveWithAuthorization
    TOKEN_DOMAIN_MISMATCH = "token_domain_mismatch"  # noqa: S105 - the offer's EIP-712 name/version are not the token's
    ESCROW_NOT_GENUINE = "escrow_not_genuine"  # extra.escrow does not hold X402Escrow's code
    POLICY_DENIED = "policy"  # the spending policy said no; PolicyDenied.code is one of the codes below

    # -- the buyer's spending policy (Decision.code, PolicyDenied.code); DEADLINE_TOO_FAR above is one too
    ALLOWED = "allowed"
    OVER_PER_REQUEST = "over_per_request"
    NETWORK_NOT_ALLOWED = "network_not_allowed"
    TOKEN_NOT_ALLOWED = "token_not_allowed"  # noqa: S105 - a reason code, not a secret
    ESCROW_NOT_ALLOWED = "escrow_not_allowed"
    SELLER_NOT_ALLOWED = "seller_not_allowed"
    HOST_NOT_ALLOWED = "host_not_allowed"
    HOST_UNKNOWN = "host_unknown"  # a host allowlist is set but the payer never saw the request (SDK plugin)
    OVER_TOTAL_BUDGET = "over_total_budget"
    OVER_TASK_BUDGET = "over_task_budget"
    OVER_SELLER_BUDGET = "over_seller_budget"
    OVER_WINDOW_BUDGET = "over_window_budget"
    SETTLEMENT_NOT_ALLOWED = "settlement_not_allowed"  # the offer's settlement mode is not the one required
    CUSTOM = "custom"  # a PaymentPolicy hook of the caller's said no

    # -- why the buyer's ledger released a reservation (audit log)
    NEVER_SENT = "never_sent"  # the payment was journaled but never sent
    CHAIN_FINAL = "chain_final"  # the chain's final state settled it

    # -- the facilitator service refuses a call (FacilitatorError.reason, the answer's `error`)
    UNSUPPORTED_SETTLEMENT = "unsupported_settlement"  # it settles 'hold' only
    NOT_YOUR_PAY_TO = "not_your_pay_to"  # the payTo is not one of the API key's
    NOT_YOUR_ESCROW = "not_your_escrow"
    UNKNOWN_ESCROW = "unknown_escrow"
    NOT_DEPOSITED = "not_deposited"
    ALREADY_DELIVERED = "already_delivered"
    DELIVERY_CONFLICT = "delivery_conflict"  # another delivery hash is already recorded for the escrow
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    INVALID_REQUEST = "invalid_request"
    BODY_TOO_LARGE = "body_too_large"
    NOT_FOUND = "not_found"
    IDEMPOTENCY_KEY_REQUIRED = "idempotency_key_required"
    INVALID_IDEMPOTENCY_KEY = "invalid_idempotency_key"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
