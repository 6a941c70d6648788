"""Every rule a PAYMENT-SIGNATURE must pass before the seller spends gas depositing it.

Two stages. `verify_offchain` is pure (no RPC): it decodes the header and checks the
payment against the offer the seller computed for *this* request, with the chain
time passed in. `verify_onchain` then asks the chain what only it knows: the buyer's
balance, whether the authorization was used or cancelled, and an `eth_call`
simulation of the deposit itself; it is `read_onchain` (the reads, one round trip)
followed by `judge_onchain` (pure). Each rule broken raises `Refusal` with the
machine-readable reason and the values involved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eth_typing import ChecksumAddress
from x402.schemas import PaymentPayload

from escrow_py.chain import rpc
from escrow_py.chain.escrow import Settlement
from escrow_py.chain.port import EscrowChain, PaymentLook
from escrow_py.protocol.eip3009 import recover_signer
from escrow_py.protocol.errors import ContractRevert, ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import Terms, request_hash
from escrow_py.protocol.wire import (
    SCHEME,
    EscrowExtra,
    EscrowPayload,
    EscrowRequirements,
    SettlementMode,
    decode_payment_signature,
)

# What a serve-first settlement is simulated with before the handler has run: any non-zero hash
# (the pull, which is what can fail, does not depend on it).
PROBE_HASH = b"\x01" * 32

# A header that does not decode is a client bug (400); a payment that decodes but breaks a
# rule is refused with a fresh offer (402), as x402 does.
_UNDECODABLE = {Reason.INVALID_PAYLOAD, Reason.HEADER_TOO_LARGE, Reason.UNSUPPORTED_VERSION}


# The short detail a 402's `error` may carry after its reason ("simulation_failed: RecipientBlocked(...)").
MAX_DETAIL = 160


class Refusal(ProtocolError):
    """The payment breaks a rule; `status` is the HTTP status to answer with (400 or 402).

    `detail` is a short public explanation (a decoded revert, never a secret) that the
    402's `error` field carries after the reason: `error` is `"<reason>"` or
    `"<reason>: <detail>"`.
    """

    def __init__(self, reason: Reason | str, message: str, *, detail: str | None = None) -> None:
        super().__init__(reason, message)
        self.detail = detail[:MAX_DETAIL] if detail else None

    @property
    def status(self) -> int:
        return 400 if self.reason in _UNDECODABLE else 402

    @property
    def error(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else str(self.reason)


def offer_for(
    *,
    network: str,
    amount: int,
    asset: str,
    pay_to: str,
    escrow: str,
    operator: str,
    token_name: str,
    token_version: str,
    max_timeout_seconds: int,
    method: str,
    resource_url: str,
    body: bytes,
    settlement: SettlementMode = SettlementMode.HOLD,
) -> EscrowRequirements:
    """The delivery-escrow requirements for one request: its requestHash binds method, URL and body."""
    extra = EscrowExtra(
        name=token_name,
        version=token_version,
        escrow=escrow,
        operator=operator,
        request_hash=request_hash(method, resource_url, body),
        settlement=settlement,
    )
    return EscrowRequirements(
        network=network, amount=amount, asset=asset, pay_to=pay_to, max_timeout_seconds=max_timeout_seconds, extra=extra
    )


@dataclass(frozen=True, slots=True)
class VerifiedPayment:
    """A payment that passed the off-chain rules."""

    payload: EscrowPayload
    escrow_id: bytes

    @property
    def terms(self) -> Terms:
        return self.payload.terms

    @property
    def buyer(self) -> ChecksumAddress:
        return self.payload.terms.buyer


def _reject(reason: Reason, message: str) -> Refusal:
    return Refusal(reason, message)


def _require(condition: bool, reason: Reason, message: str) -> None:
    if not condition:
        raise _reject(reason, message)


def verify_offchain(
    header: str | PaymentPayload,
    offer: EscrowRequirements,
    *,
    chain_time: int,
    min_time_left: int,
    deadline_slack: int = 30,
    payload: EscrowPayload | None = None,
    signature_checked: bool = False,
) -> VerifiedPayment:
    """Check PAYMENT-SIGNATURE against `offer`, judging time by `chain_time`.

    `header` is the header's text, or the envelope it decodes to when the caller decoded it
    already (the middleware decodes it once per request); `payload` likewise its decoded
    delivery-escrow payload.

    `signature_checked`: the signature was checked by whoever just deposited this very payment (a
    facilitator's /settle, which recovers it before it answers): everything else is still checked,
    the signer is not recovered a second time. Never for a replay, where the signature is what proves
    the requester is the buyer.
    """
    try:
        model = decode_payment_signature(header) if isinstance(header, str) else header
        return _verify_offchain(
            model,
            payload,
            offer,
            chain_time=chain_time,
            min_time_left=min_time_left,
            deadline_slack=deadline_slack,
            signature_checked=signature_checked,
        )
    except Refusal:
        raise
    except ProtocolError as exc:  # a decoding error of the shared wire layer
        raise Refusal(exc.reason, str(exc)) from None


def _verify_offchain(
    model: PaymentPayload,
    payload: EscrowPayload | None,
    offer: EscrowRequirements,
    *,
    chain_time: int,
    min_time_left: int,
    deadline_slack: int,
    signature_checked: bool,
) -> VerifiedPayment:
    accepted = model.accepted
    # The specific fields first, so the reason names what differs.
    _require(accepted.scheme == SCHEME, Reason.UNSUPPORTED_SCHEME, f"scheme {accepted.scheme!r}")
    _require(
        accepted.network == offer.network,
        Reason.NETWORK_MISMATCH,
        f"network {accepted.network!r}, expected {offer.network!r}",
    )
    requirements = EscrowRequirements.from_model(accepted)
    _require(
        requirements.asset == offer.asset, Reason.ASSET_MISMATCH, f"asset {requirements.asset}, expected {offer.asset}"
    )
    _require(
        requirements.pay_to == offer.pay_to,
        Reason.RECEIVER_MISMATCH,
        f"payTo {requirements.pay_to}, expected {offer.pay_to}",
    )
    _require(
        requirements.extra.escrow == offer.extra.escrow,
        Reason.ESCROW_MISMATCH,
        f"escrow {requirements.extra.escrow}, expected {offer.extra.escrow}",
    )
    _require(
        requirements.amount == offer.amount,
        Reason.AMOUNT_MISMATCH,
        f"amount {requirements.amount}, expected {offer.amount}",
    )
    _require(
        requirements.extra.request_hash == offer.extra.request_hash,
        Reason.REQUEST_HASH_MISMATCH,
        "the payment was made for another request (method, URL or body)",
    )
    _require(requirements == offer, Reason.REQUIREMENTS_MISMATCH, "accepted differs from the requirements offered")

    if payload is None:
        payload = EscrowPayload.from_json(model.payload)
    terms, auth = payload.terms, payload.authorization
    _require(terms.seller == offer.pay_to, Reason.RECEIVER_MISMATCH, f"terms.seller {terms.seller}")
    _require(terms.operator == offer.extra.operator, Reason.OPERATOR_MISMATCH, f"terms.operator {terms.operator}")
    _require(terms.token == offer.asset, Reason.ASSET_MISMATCH, f"terms.token {terms.token}")
    _require(terms.amount == offer.amount, Reason.AMOUNT_MISMATCH, f"terms.amount {terms.amount}")
    _require(
        terms.request_hash == offer.extra.request_hash,
        Reason.REQUEST_HASH_MISMATCH,
        "terms.requestHash is not this request's",
    )
    earliest, latest = chain_time + min_time_left, chain_time + offer.max_timeout_seconds + deadline_slack
    _require(
        terms.deadline >= earliest,
        Reason.DEADLINE_TOO_SOON,
        f"deadline {terms.deadline} leaves less than {min_time_left}s after chain time {chain_time}",
    )
    _require(
        terms.deadline <= latest,
        Reason.DEADLINE_TOO_FAR,
        f"deadline {terms.deadline} is after {latest} (maxTimeoutSeconds {offer.max_timeout_seconds})",
    )

    escrow_id = terms.escrow_id(offer.chain_id, offer.extra.escrow)
    _require(auth.from_ == terms.buyer, Reason.TERMS_MISMATCH, f"authorization.from {auth.from_} is not the buyer")
    _require(auth.to == offer.extra.escrow, Reason.ESCROW_MISMATCH, f"authorization.to {auth.to}")
    _require(auth.value == offer.amount, Reason.AMOUNT_MISMATCH, f"authorization.value {auth.value}")
    _require(
        auth.nonce == escrow_id,
        Reason.NONCE_MISMATCH,
        "authorization.nonce is not the escrow id of these terms (terms altered after signing?)",
    )
    _require(
        auth.valid_after < chain_time,
        Reason.AUTHORIZATION_NOT_YET_VALID,
        f"validAfter {auth.valid_after} is not before chain time {chain_time}",
    )
    _require(
        auth.valid_before > chain_time + min_time_left,
        Reason.AUTHORIZATION_EXPIRED,
        f"validBefore {auth.valid_before} leaves no time to deposit (chain time {chain_time})",
    )

    if signature_checked:
        return VerifiedPayment(payload, escrow_id)
    domain = offer.token_domain()
    try:
        signer = recover_signer(domain, auth, payload.signature)
    except ValueError as exc:
        raise _reject(Reason.INVALID_SIGNATURE, str(exc)) from None
    _require(signer == terms.buyer, Reason.INVALID_SIGNATURE, f"signed by {signer}, not by the buyer {terms.buyer}")
    return VerifiedPayment(payload, escrow_id)


@dataclass(frozen=True, slots=True)
class OnchainFacts:
    """What only the chain knows about a payment, read at once: each value, or the exception its read raised.

    `gas` is the simulation's gas limit (margin included), or the ContractRevert it met.
    """

    balance: int | BaseException
    used: bool | BaseException
    gas: int | BaseException
    serve_first: bool = False


def serve_first_probe(payload: EscrowPayload) -> Settlement:
    """The settlement a serve-first payment is simulated as before its handler has run (PROBE_HASH)."""
    return Settlement(payload.terms, payload.authorization, payload.signature, PROBE_HASH)


def onchain_from_look(look: PaymentLook, *, serve_first: bool = False) -> OnchainFacts | None:
    """The on-chain reads EscrowChain.look made with a check (None: it was asked for none): the same
    facts read_onchain reads, taken from the round trip that read the escrow's state and the clock."""
    if look.balance is None or look.used is None or look.gas is None:
        return None
    return OnchainFacts(look.balance, look.used, look.gas, serve_first)


def read_onchain(payment: VerifiedPayment, *, chain: EscrowChain, serve_first: bool = False) -> OnchainFacts:
    """Balance, authorization state, and a simulation of the deposit (or, `serve_first`, of the settlement
    that pulls the same authorization) as the chain's sender would send it: three reads in one round trip."""
    payload = payment.payload
    terms = payload.terms
    if serve_first:
        settlement = serve_first_probe(payload)
        simulate: Callable[[], int] = lambda: chain.simulate_settle(settlement)  # noqa: E731
    else:
        simulate = lambda: chain.simulate_deposit(payload)  # noqa: E731
    balance, used, gas = rpc.gather(
        lambda: chain.balance_of(terms.token, payment.buyer),
        lambda: chain.authorization_used(terms.token, payment.buyer, payment.escrow_id),
        simulate,
    )
    return OnchainFacts(balance, used, gas, serve_first)  # type: ignore[arg-type]


def judge_onchain(payment: VerifiedPayment, facts: OnchainFacts) -> int:
    """The on-chain rules, judged in this order, the simulation last; the gas limit to send the deposit with.

    Pure: a read that failed (the node) raises its exception as it was; a rule broken raises
    Refusal. The simulation is the gas estimate itself, so the transaction is not
    simulated a second time.
    """
    what = "settlement" if facts.serve_first else "deposit"
    gas = facts.gas
    if isinstance(gas, ContractRevert) and any(isinstance(r, ContractRevert) for r in (facts.balance, facts.used)):
        # The asset's own reads revert too: not a token this payment can be pulled from.
        raise Refusal(Reason.SIMULATION_FAILED, f"{what} would revert: {gas}", detail=str(gas)) from None
    balance, used = rpc.value(facts.balance), rpc.value(facts.used)
    _require(
        balance >= payment.terms.amount,
        Reason.INSUFFICIENT_BALANCE,
        f"buyer balance {balance} < amount {payment.terms.amount}",
    )
    _require(not used, Reason.AUTHORIZATION_USED, "the authorization was already used or cancelled")
    if isinstance(gas, ContractRevert):
        raise Refusal(Reason.SIMULATION_FAILED, f"{what} would revert: {gas}", detail=str(gas)) from None
    return int(rpc.value(gas))


def verify_onchain(
    payment: VerifiedPayment, *, chain: EscrowChain, serve_first: bool = False, look: PaymentLook | None = None
) -> int:
    """read_onchain (or `look`'s reads, when EscrowChain.look was asked the same check) then judge_onchain:
    the gas limit to send the deposit with (for a settlement, simulated by eth_call, SETTLE_SIMULATED), or
    Refusal."""
    facts = None if look is None else onchain_from_look(look, serve_first=serve_first)
    if facts is None:
        facts = read_onchain(payment, chain=chain, serve_first=serve_first)
    return judge_onchain(payment, facts)
