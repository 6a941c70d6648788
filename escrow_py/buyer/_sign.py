"""Step 3, sign: the offer checked against the chain, fresh terms, their authorization, the header.

`terms_for` asks the chain (the shared EscrowChain port) what a signature needs to be safe, in one
round trip for what changes between payments (the balance and the next block's time); `sign_payment`
signs (escrow_py.protocol.eip3009.sign_authorization) and wraps the signature in what carries it, and is
called by the journal step inside the transaction that reserves the amount and records the payment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_typing import ChecksumAddress
from x402.schemas import PaymentPayload, PaymentRequirements, ResourceInfo

from escrow_py.buyer._errors import EscrowNotGenuine, PaymentRefused
from escrow_py.chain.port import EscrowChain
from escrow_py.chain.signer import Signer
from escrow_py.protocol.eip3009 import Authorization, TokenDomain, authorization_for, sign_authorization
from escrow_py.protocol.errors import ContractRevert
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import MAX_DEADLINE_WINDOW, Terms
from escrow_py.protocol.wire import X402_VERSION, EscrowPayload, EscrowRequirements, encode_payment_signature


def terms_for(
    chain: EscrowChain, buyer: ChecksumAddress, req: EscrowRequirements, rhash: bytes
) -> tuple[TokenDomain, Terms, Authorization]:
    """The offer's checks against the chain, then fresh terms and their authorization (unsigned).

    Raises PaymentRefused (a subclass naming the rule) for an offer that must not be signed, a ChainError
    when the chain cannot be read. The genuine-escrow check comes before anything is read of the token.
    """
    chain_id = chain.chain_id
    if req.chain_id != chain_id:
        raise PaymentRefused(Reason.NETWORK_MISMATCH, f"the offer is for {req.network} but the RPC is chain {chain_id}")
    # The token lets only `to` redeem the authorization: `to` must be the genuine escrow, or anyone
    # naming their own wallet (or a look-alike contract) as the escrow takes the money.
    if not (check := chain.check_escrow(req.extra.escrow)).genuine:
        raise EscrowNotGenuine(check)
    if req.max_timeout_seconds > MAX_DEADLINE_WINDOW:
        raise PaymentRefused(
            Reason.DEADLINE_TOO_FAR, f"maxTimeoutSeconds {req.max_timeout_seconds} exceeds {MAX_DEADLINE_WINDOW}"
        )
    try:
        domain = chain.token_domain(req.asset)
    except ContractRevert as exc:  # no code there, or it reverts
        raise PaymentRefused(
            Reason.ASSET_NOT_ERC3009, f"the offer's asset {req.asset} does not answer name() and version() ({exc})"
        ) from exc
    if (domain.name, domain.version) != (req.extra.name, req.extra.version):
        raise PaymentRefused(
            Reason.TOKEN_DOMAIN_MISMATCH,
            f"token {req.asset} signs as ({domain.name!r}, {domain.version!r}), the offer says "
            f"({req.extra.name!r}, {req.extra.version!r})",
        )
    # The balance and the next block's time in one round trip on the paying path.
    balance, next_time = chain.balance_and_next_block_time(req.asset, buyer)
    if balance < req.amount:
        raise PaymentRefused(Reason.INSUFFICIENT_BALANCE, f"{buyer} holds {balance} of {req.asset}, needs {req.amount}")
    # The contract (deadline) and the token (validBefore) judge the deposit by the time of the block
    # that includes it. That is the next block's time, not the latest block's: on a chain that mines
    # only on demand the latest block can be older than the whole window.
    deadline = next_time + req.max_timeout_seconds
    terms = Terms(
        buyer=buyer,
        seller=req.pay_to,
        operator=req.extra.operator,
        token=req.asset,
        amount=req.amount,
        deadline=deadline,
        request_hash=rhash,
        salt=Terms.new_salt(),
    )
    # validBefore = deadline: a deposit after the deadline reverts anyway, one before it needs the token's consent.
    return domain, terms, authorization_for(terms, req.extra.escrow, chain_id, 0, deadline)


@dataclass(frozen=True, slots=True)
class Signed:
    """A signed payment as it leaves the process: the SDK's `payload`, and the PAYMENT-SIGNATURE `header`
    around it (what the journal keeps and the client sends)."""

    terms: Terms
    authorization: Authorization
    payload: dict[str, Any]
    header: str


def sign_payment(
    signer: Signer,
    domain: TokenDomain,
    terms: Terms,
    authorization: Authorization,
    *,
    accepted: PaymentRequirements,
    resource: ResourceInfo | None = None,
) -> Signed:
    """Sign the authorization and wrap it for the offer it accepts."""
    payload = payment_payload(terms, authorization, sign_authorization(signer, domain, authorization))
    return Signed(terms, authorization, payload, payment_header(accepted, payload, resource))


def payment_payload(terms: Terms, authorization: Authorization, signature: bytes) -> dict[str, Any]:
    """The `payload` of a delivery-escrow PaymentPayload (what the SDK plugin hands the SDK)."""
    return EscrowPayload(authorization=authorization, signature=signature, terms=terms).to_json()


def payment_header(accepted: PaymentRequirements, payload: dict[str, Any], resource: ResourceInfo | None = None) -> str:
    """The PAYMENT-SIGNATURE value: the x402 envelope around `payload`, for the offer it accepts."""
    envelope = PaymentPayload(x402_version=X402_VERSION, resource=resource, accepted=accepted, payload=payload)
    return encode_payment_signature(envelope)
