"""A tiny test-side payer: answers a 402 of the seller middleware with a signed PAYMENT-SIGNATURE.

Written on the shared layer only (escrow_py.protocol: terms, eip3009, wire), independently of
the buyer client, so the seller's tests don't depend on it. Hooks let a test sign
something wrong on purpose, or tamper with the JSON after signing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from helpers import BUYER, address, dev

from escrow_py.chain.signer import Signer
from escrow_py.protocol.eip3009 import (
    RECEIVE_WITH_AUTHORIZATION,
    Authorization,
    authorization_for,
    typed_data,
)
from escrow_py.protocol.terms import Terms, request_hash
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    EscrowPayload,
    EscrowRequirements,
    decode_payment_required,
    encode_header,
)

if TYPE_CHECKING:
    from fixtures.chain import Chain
    from x402.schemas import PaymentRequired


@dataclass(frozen=True)
class Payment:
    header: str
    terms: Terms
    authorization: Authorization
    signature: bytes
    escrow_id: bytes


def sign_payment(
    chain: Chain | None,
    required: PaymentRequired,
    *,
    buyer: int = BUYER,
    signer: Signer | None = None,
    deadline: int | None = None,
    valid_after: int = 0,
    valid_before: int | None = None,
    terms_changes: dict[str, Any] | None = None,
    auth_changes: dict[str, Any] | None = None,
    tamper: Callable[[dict[str, Any]], None] | None = None,
) -> Payment:
    """Sign the first `accepts` entry of `required` as dev account `buyer` (or with `signer`'s key).

    `chain` None (a chain without a `now()`, the unit tier's fake): `deadline` must be given."""
    accepted = required.accepts[0]
    req = EscrowRequirements.from_model(accepted)
    terms = Terms(
        buyer=address(buyer),
        seller=req.pay_to,
        operator=req.extra.operator,
        token=req.asset,
        amount=req.amount,
        deadline=deadline if deadline is not None else _now(chain) + req.max_timeout_seconds - 10,
        request_hash=req.extra.request_hash,
        salt=os.urandom(32),
    )
    if terms_changes:
        terms = terms.with_(**terms_changes)
    auth = authorization_for(
        terms, req.extra.escrow, req.chain_id, valid_after, terms.deadline if valid_before is None else valid_before
    )
    if auth_changes:
        auth = auth.with_(**auth_changes)
    domain = req.token_domain()
    signature = (signer or dev(buyer)).sign_typed_data(typed_data(RECEIVE_WITH_AUTHORIZATION, domain, auth))
    envelope: dict[str, Any] = {
        "x402Version": 2,
        "accepted": accepted.model_dump(by_alias=True, exclude_none=True),
        "payload": EscrowPayload(authorization=auth, signature=signature, terms=terms).to_json(),
    }
    if required.resource is not None:
        envelope["resource"] = required.resource.model_dump(by_alias=True, exclude_none=True)
    if tamper is not None:
        tamper(envelope)
    return Payment(encode_header(envelope), terms, auth, signature, auth.nonce)


def _now(chain: Chain | None) -> int:
    if chain is None:
        raise ValueError("sign_payment without a chain needs its deadline")
    return chain.now()


async def quote(client: httpx.AsyncClient, method: str, path: str, body: bytes = b"") -> PaymentRequired:
    """The 402 for this request, checked the way a careful client checks it."""
    response = await client.request(method, path, content=body)
    assert response.status_code == 402, response.text
    required = decode_payment_required(response.headers[PAYMENT_REQUIRED_HEADER])
    assert required.resource is not None
    req = EscrowRequirements.from_model(required.accepts[0])
    assert req.extra.request_hash == request_hash(method, required.resource.url, body)
    return required


async def buy(
    client: httpx.AsyncClient, chain: Chain, method: str, path: str, body: bytes = b"", **options: Any
) -> tuple[httpx.Response, Payment]:
    """402, sign, pay: the response to the paid request and the payment sent."""
    payment = sign_payment(chain, await quote(client, method, path, body), **options)
    response = await client.request(method, path, content=body, headers={PAYMENT_SIGNATURE_HEADER: payment.header})
    return response, payment
