"""The buyer's payment errors: each says what happened to the money (tree in escrow_py.buyer)."""

from __future__ import annotations

from escrow_py.errors import EscrowError


def _hex(value: bytes | None) -> str:
    return "0x" + value.hex() if value is not None else "unknown"


class PaymentError(EscrowError):
    """A paid request did not end in a verified delivery; `escrow_id` is None when nothing was signed."""

    def __init__(self, message: str, *, escrow_id: bytes | None = None) -> None:
        self.escrow_id = escrow_id
        super().__init__(message)


class PaymentRefused(PaymentError):
    """The client refused to pay: nothing was signed, no money moved."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"payment refused ({rule}): {message}; nothing signed, no money moved")


class RequestHashMismatch(PaymentRefused):
    """The 402's extra.requestHash is not the hash of the request this client sent."""

    def __init__(self, expected: bytes, offered: bytes, method: str, url: str) -> None:
        self.expected = expected
        self.offered = offered
        super().__init__(
            "request_hash_mismatch",
            f"the seller asks to sign requestHash {_hex(offered)} but {method} {url} with this body hashes "
            f"to {_hex(expected)}",
        )


class PolicyDenied(PaymentRefused):
    """The spending policy denied the payment: `.code` (a ReasonCode value) names the rule, `.reason`
    explains it, and `.limit`, `.wanted`, `.available` carry the numbers of a limit that was hit."""

    def __init__(
        self,
        reason: str,
        *,
        code: str = "custom",
        limit: int | None = None,
        wanted: int | None = None,
        available: int | None = None,
    ) -> None:
        self.reason = reason
        self.code = code
        self.limit = limit
        self.wanted = wanted
        self.available = available
        super().__init__("policy", f"{code}: {reason}")


class ResponseInvalid(PaymentError):
    """The delivery was verified (its hash is the committed one) but the caller's validator rejected it.

    The payment is delivered and settled: the money is the seller's. The agent must not act on
    the body; the journal and the audit trail record the failure as evidence.
    """

    def __init__(self, escrow_id: bytes, problem: str, body: bytes) -> None:
        self.problem = problem
        self.body = body
        super().__init__(
            f"escrow {_hex(escrow_id)}: the response failed validation ({problem}); the payment was delivered "
            "and settled, the money is spent",
            escrow_id=escrow_id,
        )


class PaymentRejected(PaymentError):
    """The seller refused the signed payment and had not deposited it when checked.

    The signed authorization stays usable until `valid_before`; recover() marks it
    void once that has passed without a deposit (or refunds it if the seller deposited after all).
    """

    def __init__(self, escrow_id: bytes, reason: str | None, status: int, valid_before: int) -> None:
        self.reason = reason
        self.status = status
        self.valid_before = valid_before
        super().__init__(
            f"seller answered {status} ({reason or 'no reason'}) to the signed payment for escrow {_hex(escrow_id)}; "
            f"not deposited when checked, no money moved; the authorization expires at {valid_before}",
            escrow_id=escrow_id,
        )


class PaymentNotDelivered(PaymentError):
    """The payment was (or may have been) deposited but no verified delivery came back.

    The money is held by the escrow: refundable to the buyer after `deadline` by the
    keeper or by recover(), or released if the seller still delivers in time.
    """

    def __init__(self, escrow_id: bytes, deadline: int, detail: str) -> None:
        self.deadline = deadline
        super().__init__(
            f"escrow {_hex(escrow_id)}: {detail}; the payment is held or about to be, refundable after "
            f"deadline {deadline} by the keeper or recover()",
            escrow_id=escrow_id,
        )


class DeliveryMismatch(PaymentError):
    """The response body's keccak256 differs from the hash the seller committed to."""

    def __init__(self, escrow_id: bytes, committed: bytes | None, received: bytes) -> None:
        self.committed = committed
        self.received = received
        super().__init__(
            f"escrow {_hex(escrow_id)}: the body hashes to {_hex(received)} but the seller committed to "
            f"{_hex(committed)}; the journal keeps both as evidence",
            escrow_id=escrow_id,
        )


class HandlerFailedRefunded(PaymentError):
    """The seller's handler failed and the seller refunded the escrow at once."""

    def __init__(self, escrow_id: bytes, refund_tx: bytes | None, status: int) -> None:
        self.refund_tx = refund_tx
        self.status = status
        super().__init__(
            f"escrow {_hex(escrow_id)}: the seller's handler failed with {status} and refunded the payment "
            f"in tx {_hex(refund_tx)}",
            escrow_id=escrow_id,
        )
