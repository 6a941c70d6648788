"""Malformed and hostile payments through the real app: 400 or 402 with the reason, never a 500, never a deposit."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fixtures.chain import Chain
from helpers import BUYER, STRANGER, address, cancel_authorization, dev

from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import Terms
from escrow_py.protocol.wire import (
    MAX_HEADER_BYTES,
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    decode_payment_required,
)

from .payer import buy, quote, sign_payment
from .shop import Shop, deposits

OTHER = "0x" + "ab" * 20


@dataclass(frozen=True)
class Attempt:
    header: str
    method: str = "GET"
    path: str = "/report/a"
    body: bytes = b""


Build = Callable[[Chain, httpx.AsyncClient], Awaitable[Attempt]]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def raw(header: str) -> Build:
    async def build(chain: Chain, client: httpx.AsyncClient) -> Attempt:
        return Attempt(header)

    return build


def signed(
    method: str = "GET",
    path: str = "/report/a",
    body: bytes = b"",
    *,
    send_as: tuple[str, str, bytes] | None = None,
    **options: Any,
) -> Build:
    """A payment signed for (method, path, body), sent as `send_as` (default: the same request)."""

    async def build(chain: Chain, client: httpx.AsyncClient) -> Attempt:
        now = chain.now()
        # Times are given as functions of the chain's clock, read when the case runs.
        timed = {"deadline", "valid_after", "valid_before"}
        resolved = {k: (v(now) if k in timed and callable(v) else v) for k, v in options.items()}
        payment = sign_payment(chain, await quote(client, method, path, body), **resolved)
        m, p, b = send_as or (method, path, body)
        return Attempt(payment.header, m, p, b)

    return build


def tampered(edit: Callable[[dict[str, Any]], None]) -> Build:
    return signed(tamper=edit)


def _set(*path_and_value: Any) -> Callable[[dict[str, Any]], None]:
    *keys, value = path_and_value

    def edit(envelope: dict[str, Any]) -> None:
        node = envelope
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def _delete(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(envelope: dict[str, Any]) -> None:
        node = envelope
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return edit


def _alter_terms_and_nonce(envelope: dict[str, Any]) -> None:
    """Change a term after signing and make the nonce match it again: only the signature can tell."""
    terms = envelope["payload"]["terms"]
    terms["deadline"] = int(terms["deadline"]) - 5
    escrow = envelope["accepted"]["extra"]["escrow"]
    envelope["payload"]["authorization"]["nonce"] = "0x" + Terms.from_json(terms).escrow_id(84532, escrow).hex()


def replayed_on_another_route() -> Build:
    async def build(chain: Chain, client: httpx.AsyncClient) -> Attempt:
        response, payment = await buy(client, chain, "GET", "/report/a")
        assert response.status_code == 200
        return Attempt(payment.header, "GET", "/report/b")

    return build


def cancelled() -> Build:
    async def build(chain: Chain, client: httpx.AsyncClient) -> Attempt:
        payment = sign_payment(chain, await quote(client, "GET", "/report/a"))
        cancel_authorization(chain, payment.terms)
        return Attempt(payment.header)

    return build


CASES: list[tuple[str, Build, int, str]] = [
    # Does not decode: 400.
    ("bad-base64", raw("%%% not base64 %%%"), 400, Reason.INVALID_PAYLOAD),
    ("bad-json", raw(_b64(b"{not json")), 400, Reason.INVALID_PAYLOAD),
    ("json-array", raw(_b64(b"[1, 2, 3]")), 400, Reason.INVALID_PAYLOAD),
    ("oversized-header", raw("A" * (MAX_HEADER_BYTES + 4)), 400, Reason.HEADER_TOO_LARGE),
    ("x402-version-1", tampered(_set("x402Version", 1)), 400, Reason.UNSUPPORTED_VERSION),
    ("no-accepted", tampered(_delete("accepted")), 400, Reason.INVALID_PAYLOAD),
    ("payload-not-object", tampered(_set("payload", "x")), 400, Reason.INVALID_PAYLOAD),
    ("amount-wrong-type", tampered(_set("payload", "terms", "amount", [1])), 400, Reason.INVALID_PAYLOAD),
    ("deadline-negative", tampered(_set("payload", "terms", "deadline", -1)), 400, Reason.INVALID_PAYLOAD),
    ("signature-not-hex", tampered(_set("payload", "signature", "0xzz")), 400, Reason.INVALID_PAYLOAD),
    ("signature-too-short", tampered(_set("payload", "signature", "0x1234")), 400, Reason.INVALID_PAYLOAD),
    ("no-authorization", tampered(_delete("payload", "authorization")), 400, Reason.INVALID_PAYLOAD),
    ("buyer-not-address", tampered(_set("payload", "terms", "buyer", "0x12")), 400, Reason.INVALID_PAYLOAD),
    # Decodes but is wrong: 402.
    ("wrong-scheme", tampered(_set("accepted", "scheme", "exact")), 402, Reason.UNSUPPORTED_SCHEME),
    ("wrong-network", tampered(_set("accepted", "network", "eip155:8453")), 402, Reason.NETWORK_MISMATCH),
    ("wrong-asset", tampered(_set("accepted", "asset", OTHER)), 402, Reason.ASSET_MISMATCH),
    ("wrong-payTo", tampered(_set("accepted", "payTo", OTHER)), 402, Reason.RECEIVER_MISMATCH),
    ("wrong-escrow", tampered(_set("accepted", "extra", "escrow", OTHER)), 402, Reason.ESCROW_MISMATCH),
    ("wrong-amount", tampered(_set("accepted", "amount", "1")), 402, Reason.AMOUNT_MISMATCH),
    ("wrong-timeout", tampered(_set("accepted", "maxTimeoutSeconds", 9999)), 402, Reason.REQUIREMENTS_MISMATCH),
    ("terms-seller", signed(terms_changes={"seller": OTHER}), 402, Reason.RECEIVER_MISMATCH),
    ("terms-operator", signed(terms_changes={"operator": OTHER}), 402, Reason.OPERATOR_MISMATCH),
    ("terms-token", signed(terms_changes={"token": OTHER}), 402, Reason.ASSET_MISMATCH),
    ("terms-amount", signed(terms_changes={"amount": 1}), 402, Reason.AMOUNT_MISMATCH),
    ("auth-to-not-escrow", signed(auth_changes={"to": OTHER}), 402, Reason.ESCROW_MISMATCH),
    ("auth-value", signed(auth_changes={"value": 1}), 402, Reason.AMOUNT_MISMATCH),
    ("auth-nonce", signed(auth_changes={"nonce": os.urandom(32)}), 402, Reason.NONCE_MISMATCH),
    ("deadline-too-far", signed(deadline=lambda now: now + 10_000), 402, Reason.DEADLINE_TOO_FAR),
    ("deadline-too-soon", signed(deadline=lambda now: now + 3), 402, Reason.DEADLINE_TOO_SOON),
    ("expired-authorization", signed(valid_before=lambda now: now + 2), 402, Reason.AUTHORIZATION_EXPIRED),
    ("not-yet-valid", signed(valid_after=lambda now: now + 600), 402, Reason.AUTHORIZATION_NOT_YET_VALID),
    ("signed-by-another-key", signed(signer=dev(STRANGER)), 402, Reason.INVALID_SIGNATURE),
    (
        "terms-altered-after-signing",
        tampered(_set("payload", "terms", "salt", "0x" + "11" * 32)),
        402,
        Reason.NONCE_MISMATCH,
    ),
    ("terms-and-nonce-altered", tampered(_alter_terms_and_nonce), 402, Reason.INVALID_SIGNATURE),
    ("paid-for-another-url", signed(send_as=("GET", "/report/b", b"")), 402, Reason.REQUEST_HASH_MISMATCH),
    (
        "paid-for-another-method",
        signed("POST", "/echo", b"x", send_as=("PUT", "/echo", b"x")),
        402,
        Reason.REQUEST_HASH_MISMATCH,
    ),
    (
        "paid-for-another-body",
        signed("POST", "/echo", b"x", send_as=("POST", "/echo", b"y")),
        402,
        Reason.REQUEST_HASH_MISMATCH,
    ),
    ("replayed-on-another-route", replayed_on_another_route(), 402, Reason.REQUEST_HASH_MISMATCH),
    ("insufficient-balance", signed(buyer=STRANGER), 402, Reason.INSUFFICIENT_BALANCE),
    ("cancelled-authorization", cancelled(), 402, Reason.AUTHORIZATION_USED),
]


@pytest.mark.parametrize(("build", "status", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_payment_is_refused_with_its_reason_and_nothing_moves(
    chain: Chain, shop: Shop, build: Build, status: int, reason: str
) -> None:
    holders = [address(BUYER), address(STRANGER), shop.config.pay_to, chain.escrow.address]

    async def run() -> None:
        async with shop.client() as client:
            attempt = await build(chain, client)
            start = int(chain.w3.eth.block_number) + 1
            balances = [chain.token.balance_of(h) for h in holders]
            calls = dict(shop.calls)
            response = await client.request(
                attempt.method, attempt.path, content=attempt.body, headers={PAYMENT_SIGNATURE_HEADER: attempt.header}
            )
        assert response.status_code == status, response.text
        assert response.json()["error"] == reason
        required = decode_payment_required(response.headers[PAYMENT_REQUIRED_HEADER])
        assert required.error == reason
        assert required.accepts, "a refusal carries a fresh offer to pay again"
        assert response.headers["cache-control"] == "no-store"
        assert deposits(chain, start) == []
        assert [chain.token.balance_of(h) for h in holders] == balances
        assert shop.calls == calls, "the handler must not run for a refused payment"

    asyncio.run(run())


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 25
