"""The seller's verification: every rule, with the reason it answers, off-chain and on a real anvil."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from fixtures.chain import Chain
from helpers import BUYER, OPERATOR, SELLER, STRANGER, cancel_authorization, dev
from x402.schemas import PaymentPayload

from escrow_py.protocol.eip3009 import RECEIVE_WITH_AUTHORIZATION, authorization_for, typed_data
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import Terms
from escrow_py.protocol.wire import MAX_HEADER_BYTES, EscrowPayload, EscrowRequirements
from escrow_py.seller import Refusal, offer_for, verify_offchain, verify_onchain

CHAIN_ID = 84532
NOW = 1_800_000_000
ESCROW = "0x" + "e5" * 20
TOKEN = "0x" + "70" * 20
URL = "http://127.0.0.1:8000/report/7"


def _offer(*, escrow: str = ESCROW, token: str = TOKEN, method: str = "GET", url: str = URL, body: bytes = b"",
           amount: int = 10_000) -> EscrowRequirements:  # fmt: skip
    return offer_for(network=f"eip155:{CHAIN_ID}", amount=amount, asset=token, pay_to=dev(SELLER).address,
                     escrow=escrow, operator=dev(OPERATOR).address, token_name="USDC", token_version="2",
                     max_timeout_seconds=120, method=method, resource_url=url, body=body)  # fmt: skip


def _pay(
    offer: EscrowRequirements,
    *,
    now: int = NOW,
    signer: int = BUYER,
    ttl: int = 100,
    edit_terms: Callable[[Terms], Terms] | None = None,
    valid_after: int = 0,
    valid_before: int | None = None,
) -> tuple[EscrowPayload, Any]:
    """A payment for `offer` signed by dev account `signer`, its terms optionally edited after signing."""
    terms = Terms(buyer=dev(BUYER).address, seller=offer.pay_to, operator=offer.extra.operator, token=offer.asset,
                  amount=offer.amount, deadline=now + ttl, request_hash=offer.extra.request_hash,
                  salt=os.urandom(32))  # fmt: skip
    auth = authorization_for(terms, offer.extra.escrow, CHAIN_ID, valid_after, valid_before or terms.deadline)
    domain = offer.token_domain()
    # Another key signs the very same message: sign_authorization itself refuses a non-payer signer.
    signature = dev(signer).sign_typed_data(typed_data(RECEIVE_WITH_AUTHORIZATION, domain, auth))
    if edit_terms is not None:
        terms = edit_terms(terms)
    return EscrowPayload(authorization=auth, signature=signature, terms=terms), offer.to_model()


def _header(payload: EscrowPayload, accepted: Any, mutate: Callable[[dict[str, Any]], None] | None = None) -> str:
    data = json.loads(json.dumps(PaymentPayload(x402_version=2, accepted=accepted, payload=payload.to_json())
                                 .model_dump(by_alias=True, exclude_none=True)))  # fmt: skip
    if mutate is not None:
        mutate(data)
    return base64.b64encode(json.dumps(data).encode()).decode()


def _verify(header: str, offer: EscrowRequirements | None = None) -> Any:
    return verify_offchain(header, offer or _offer(), chain_time=NOW, min_time_left=10)


def test_a_good_payment_passes_and_names_its_escrow() -> None:
    payload, accepted = _pay(_offer())
    verified = _verify(_header(payload, accepted))
    assert verified.terms == payload.terms
    assert verified.escrow_id == payload.terms.escrow_id(CHAIN_ID, ESCROW)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


OTHER = "0x" + "99" * 20

# (case, header builder, reason, status)
CASES: list[tuple[str, Callable[[], str], Reason, int]] = [
    ("bad base64", lambda: "%%%not-base64%%%", Reason.INVALID_PAYLOAD, 400),
    ("bad JSON", lambda: _b64("{"), Reason.INVALID_PAYLOAD, 400),
    ("JSON array", lambda: _b64("[]"), Reason.INVALID_PAYLOAD, 400),
    ("x402 version 1", lambda: _header(*_pay(_offer()), _set("x402Version", 1)), Reason.UNSUPPORTED_VERSION, 400),
    ("oversized header", lambda: "A" * (MAX_HEADER_BYTES + 1), Reason.HEADER_TOO_LARGE, 400),
    ("accepted missing", lambda: _b64(json.dumps({"x402Version": 2, "payload": {}})), Reason.INVALID_PAYLOAD, 400),
    (
        "amount of wrong type",
        lambda: _header(*_pay(_offer()), _set("payload.terms.amount", [1])),
        Reason.INVALID_PAYLOAD,
        400,
    ),
    (
        "signature not hex",
        lambda: _header(*_pay(_offer()), _set("payload.signature", "0xzz")),
        Reason.INVALID_PAYLOAD,
        400,
    ),
    (
        "wrong scheme",
        lambda: _header(*_pay(_offer()), _set("accepted.scheme", "exact")),
        Reason.UNSUPPORTED_SCHEME,
        402,
    ),
    (
        "wrong network",
        lambda: _header(*_pay(_offer()), _set("accepted.network", "eip155:8453")),
        Reason.NETWORK_MISMATCH,
        402,
    ),
    ("wrong asset", lambda: _header(*_pay(_offer(token=OTHER))), Reason.ASSET_MISMATCH, 402),
    ("wrong payTo", lambda: _header(*_pay(_offer()), _set("accepted.payTo", OTHER)), Reason.RECEIVER_MISMATCH, 402),
    ("wrong escrow", lambda: _header(*_pay(_offer(escrow=OTHER))), Reason.ESCROW_MISMATCH, 402),
    ("wrong amount", lambda: _header(*_pay(_offer(amount=1))), Reason.AMOUNT_MISMATCH, 402),
    ("paid for another URL", lambda: _header(*_pay(_offer(url=URL + "?x=1"))), Reason.REQUEST_HASH_MISMATCH, 402),
    ("paid for another method", lambda: _header(*_pay(_offer(method="POST"))), Reason.REQUEST_HASH_MISMATCH, 402),
    ("paid for another body", lambda: _header(*_pay(_offer(body=b"{}"))), Reason.REQUEST_HASH_MISMATCH, 402),
    (
        "replayed on another route",
        lambda: _header(*_pay(_offer(url="http://127.0.0.1:8000/other"))),
        Reason.REQUEST_HASH_MISMATCH,
        402,
    ),
    (
        "timeout changed",
        lambda: _header(*_pay(_offer()), _set("accepted.maxTimeoutSeconds", 9999)),
        Reason.REQUIREMENTS_MISMATCH,
        402,
    ),
    (
        "terms amount altered after signing",
        lambda: _header(*_pay(_offer(), edit_terms=lambda t: t.with_(seller=dev(STRANGER).address))),
        Reason.RECEIVER_MISMATCH,
        402,
    ),
    (
        "terms salt altered after signing",
        lambda: _header(*_pay(_offer(), edit_terms=lambda t: t.with_(salt=b"\7" * 32))),
        Reason.NONCE_MISMATCH,
        402,
    ),
    ("deadline too soon", lambda: _header(*_pay(_offer(), ttl=5)), Reason.DEADLINE_TOO_SOON, 402),
    ("deadline too far", lambda: _header(*_pay(_offer(), ttl=10_000)), Reason.DEADLINE_TOO_FAR, 402),
    (
        "authorization not yet valid",
        lambda: _header(*_pay(_offer(), valid_after=NOW + 5)),
        Reason.AUTHORIZATION_NOT_YET_VALID,
        402,
    ),
    (
        "authorization expired",
        lambda: _header(*_pay(_offer(), valid_before=NOW + 5)),
        Reason.AUTHORIZATION_EXPIRED,
        402,
    ),
    ("signature by another key", lambda: _header(*_pay(_offer(), signer=STRANGER)), Reason.INVALID_SIGNATURE, 402),
]


@pytest.mark.parametrize(("case", "build", "reason", "status"), CASES, ids=[c[0] for c in CASES])
def test_each_broken_rule_is_refused_with_its_reason(
    case: str, build: Callable[[], str], reason: Reason, status: int
) -> None:
    with pytest.raises(Refusal) as info:
        _verify(build())
    assert (info.value.reason, info.value.status) == (reason, status), str(info.value)


def _chain_offer(chain: Chain) -> EscrowRequirements:
    return _offer(escrow=chain.escrow.address, token=chain.token.address)


def _chain_pay(chain: Chain, offer: EscrowRequirements) -> str:
    payload, accepted = _pay(offer, now=chain.now())
    return _header(payload, accepted)


def test_onchain_checks_pass_for_a_funded_unused_authorization_and_deposit_nothing(chain: Chain) -> None:
    offer = _chain_offer(chain)
    payment = verify_offchain(_chain_pay(chain, offer), offer, chain_time=chain.now(), min_time_left=10)
    before = chain.token.balance_of(chain.escrow.address)
    verify_onchain(payment, chain=chain.port(OPERATOR))
    assert chain.token.balance_of(chain.escrow.address) == before  # a simulation, not a deposit


def test_insufficient_balance_is_refused(chain: Chain) -> None:
    offer = offer_for(network=f"eip155:{CHAIN_ID}", amount=10**18, asset=chain.token.address,
                      pay_to=dev(SELLER).address, escrow=chain.escrow.address, operator=dev(OPERATOR).address,
                      token_name="USDC", token_version="2", max_timeout_seconds=120, method="GET",
                      resource_url=URL, body=b"")  # fmt: skip
    payment = verify_offchain(_chain_pay(chain, offer), offer, chain_time=chain.now(), min_time_left=10)
    with pytest.raises(Refusal) as info:
        verify_onchain(payment, chain=chain.port(OPERATOR))
    assert info.value.reason == Reason.INSUFFICIENT_BALANCE


def test_a_cancelled_authorization_is_refused(chain: Chain) -> None:
    offer = _chain_offer(chain)
    payment = verify_offchain(_chain_pay(chain, offer), offer, chain_time=chain.now(), min_time_left=10)
    cancel_authorization(chain, payment.terms)
    with pytest.raises(Refusal) as info:
        verify_onchain(payment, chain=chain.port(OPERATOR))
    assert info.value.reason == Reason.AUTHORIZATION_USED


def test_a_deposit_that_would_revert_is_refused_by_simulation(chain: Chain) -> None:
    offer = _offer(escrow=chain.escrow.address, token=chain.escrow.address)  # "token" with no ERC-3009 at all
    payload, accepted = _pay(offer, now=chain.now())
    payment = verify_offchain(_header(payload, accepted), offer, chain_time=chain.now(), min_time_left=10)
    with pytest.raises(Refusal) as info:
        verify_onchain(payment, chain=chain.port(OPERATOR))
    assert info.value.reason == Reason.SIMULATION_FAILED
