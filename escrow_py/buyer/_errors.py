"""The buyer's payment errors: each says what happened to the money (tree in escrow_py.buyer)."""

from __future__ import annotations

from escrow_py.chain.genuine import ESCROW_CODE_HASH, EscrowCode, EscrowCodeCheck
from escrow_py.protocol.errors import ChainError, EscrowError
from escrow_py.protocol.reasons import Reason


def _hex(value: bytes | None) -> str:
    return "0x" + value.hex() if value is not None else "unknown"


class PaymentError(EscrowError):
    """A paid request did not end in a verified delivery; `escrow_id` is None when nothing was signed."""

    def __init__(self, message: str, *, escrow_id: bytes | None = None) -> None:
        self.escrow_id = escrow_id
        super().__init__(message)


class PaymentRefused(PaymentError):
    """The client refused to pay: nothing was signed, no money moved."""

    def __init__(self, rule: Reason, message: str) -> None:
        self.rule = rule
        super().__init__(f"payment refused ({rule}): {message}; nothing signed, no money moved")


class RequestHashMismatch(PaymentRefused):
    """The 402's extra.requestHash is not the hash of the request this client sent."""

    def __init__(self, expected: bytes, offered: bytes, method: str, url: str) -> None:
        self.expected = expected
        self.offered = offered
        super().__init__(
            Reason.REQUEST_HASH_MISMATCH,
            f"the seller asks to sign requestHash {_hex(offered)} but {method} {url} with this body hashes "
            f"to {_hex(expected)}",
        )


class EscrowNotGenuine(PaymentRefused):
    """The 402 names as escrow an address that does not hold the genuine X402Escrow: nothing was signed.

    An authorization to such an address can be redeemed by whoever controls it (an EOA simply
    calls receiveWithAuthorization itself), so the client never signs one. `.code` is the
    reason (`no_code`: a wallet or an empty address; `other_code`: some other contract),
    `.escrow` and `.chain_id` say where, `.code_hash` what was found (None for no code) and
    `.expected` X402Escrow's runtime code hash.
    """

    def __init__(self, check: EscrowCodeCheck) -> None:
        self.escrow = check.address
        self.chain_id = check.chain_id
        self.code = check.verdict.value
        self.code_hash = check.code_hash
        self.expected = ESCROW_CODE_HASH
        if check.verdict is EscrowCode.NO_CODE:
            found = "holds no code: a wallet (EOA) or an empty address, which could redeem the authorization itself"
        else:
            found = (
                f"holds code hashing to {_hex(check.code_hash)}, not X402Escrow's {_hex(ESCROW_CODE_HASH)}: "
                "a contract that only looks like the escrow could keep the money"
            )
        super().__init__(
            Reason.ESCROW_NOT_GENUINE, f"{self.code}: escrow {self.escrow} on chain {self.chain_id} {found}"
        )


class ChainUnavailable(PaymentRefused, ChainError):
    """The chain could not be read before signing (node down, bad RPC URL, timeout): nothing was signed.

    Both a PaymentRefused and a ChainError; `.__cause__` is the typed chain error behind it.
    """

    def __init__(self, cause: ChainError) -> None:
        super().__init__(Reason.CHAIN_UNAVAILABLE, str(cause))


class PolicyDenied(PaymentRefused):
    """The spending policy denied the payment: `.code` (a Reason value) names the rule, `.reason`
    explains it, and `.limit`, `.wanted`, `.available` carry the numbers of a limit that was hit."""

    def __init__(
        self,
        reason: str,
        *,
        code: Reason = Reason.CUSTOM,
        limit: int | None = None,
        wanted: int | None = None,
        available: int | None = None,
    ) -> None:
        self.reason = reason
        self.code = code
        self.limit = limit
        self.wanted = wanted
        self.available = available
        super().__init__(Reason.POLICY_DENIED, f"{code}: {reason}")


class ResponseInvalid(PaymentError):
    """The delivery was verified (its hash is the committed one) but the caller's validator rejected it.

    A held payment is delivered and settled: the money is the seller's. A served-first one is delivered
    and not settled yet (`settled` False): the seller may still collect it, and recover() follows it to
    spent or void. The agent must not act on the body; the journal and the audit trail record the
    failure as evidence.
    """

    def __init__(self, escrow_id: bytes, problem: str, body: bytes, *, settled: bool = True) -> None:
        self.problem = problem
        self.body = body
        self.settled = settled
        money = (
            "the payment was delivered and settled, the money is spent"
            if settled
            else "the body was served first and its payment is not settled yet: the seller may still collect it"
        )
        super().__init__(
            f"escrow {_hex(escrow_id)}: the response failed validation ({problem}); {money}", escrow_id=escrow_id
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

    The money is held by the escrow (`.escrow` when known): refundable to the buyer after
    `deadline` by the keeper or by recover(), or released if the seller still delivers in
    time. A payment never deposited stays in the buyer's wallet, and recover() marks it void
    once its authorization has expired.
    """

    def __init__(self, escrow_id: bytes, deadline: int, detail: str, *, escrow: str | None = None) -> None:
        self.deadline = deadline
        self.escrow = escrow
        held_by = f"escrow {escrow}" if escrow is not None else "the escrow"
        super().__init__(
            f"escrow {_hex(escrow_id)}: {detail}; the payment is held by {held_by} or about to be, refundable "
            f"after deadline {deadline} by the keeper or recover()",
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
