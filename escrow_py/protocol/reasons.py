"""Why a payment was refused, in one vocabulary: the reasons every part of the package gives.

The values are stable strings: they go over the wire (the seller's 402 `error` and 503 body, a
ProtocolError's `.reason`), into the buyer's journal and audit log, and into metrics labels.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Machine-readable failure reasons (x402's and the x402 `escrow` scheme's names where one fits)."""

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
    # The seller's own side failed, not the payment: answered 503 with Retry-After; send the same payment again.
    CHAIN_UNAVAILABLE = "chain_unavailable"  # the seller's node is down, hung or refused
    OPERATOR_UNFUNDED = "operator_unfunded"  # the seller's operator key cannot pay for gas
    NONCE_CONFLICT = "operator_nonce_conflict"  # the operator key's nonce was taken elsewhere, even after a resync
    DEPOSIT_PENDING = "deposit_pending"  # the deposit was sent and is not confirmed yet (it may still land)
    PAYMENT_IN_PROGRESS = "payment_in_progress"  # another request or replica is handling this payment now
    FACILITATOR_UNAVAILABLE = "facilitator_unavailable"  # the seller's facilitator is down, slow or refused it
