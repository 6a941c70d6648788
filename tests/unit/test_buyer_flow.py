"""The one payment flow, driven by the sync and the async client alike, without a chain.

The clients are the real EscrowClient and AsyncEscrowClient over httpx.MockTransport (a seller that
answers 402, then its own 503, then the delivery); the steps that need the chain (prepare, judge) are
a recording stand-in, so what is checked here is the flow itself: what is sent, in which order, with
which payment, and which step runs when. Both clients must send the same requests and run the same steps.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_utils.address import to_checksum_address
from helpers import BUYER, dev

from escrow_py.buyer import AsyncEscrowClient, BuyerSettings, DeliveryMismatch, EscrowClient, ResendPolicy
from escrow_py.buyer._core import PaymentCore, Prepared
from escrow_py.buyer._offer import Offer
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import Terms, request_hash
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    EscrowExtra,
    EscrowRequirements,
    encode_payment_required,
    payment_required,
)

URL = "http://shop.test/report"
ADDRESS = to_checksum_address("0x" + "e5" * 20)
TERMS = Terms(
    buyer=ADDRESS, seller=ADDRESS, operator=ADDRESS, token=ADDRESS, amount=1, deadline=2_000_000_000,
    request_hash=b"\x00" * 32, salt=b"\x01" * 32,
)  # fmt: skip


class Steps:
    """The chain-bound steps of PaymentCore, recorded: each call is (step, what it was given)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.calls: list[tuple[str, Any]] = []
        self.real: PaymentCore | None = None  # the client's own, whose journal the client closes

    def close(self) -> None:
        if self.real is not None:
            self.real.close()

    def prepare(self, request: httpx.Request, offer: Offer) -> Prepared:
        self.calls.append(("prepare", offer.requirements.amount))
        return Prepared(b"\x11" * 32, TERMS, ADDRESS, 2_000_000_000, "signed-payment", resend_until=1e18)

    def resend_after(self, prepared: Prepared, response: httpx.Response, resent: int) -> float | None:
        self.calls.append(("resend_after", (response.status_code, resent)))
        return 0.01 if response.status_code == 503 and resent < ResendPolicy().attempts else None

    def settle(self, prepared: Prepared, response: httpx.Response) -> None:
        self.calls.append(("settle", response.status_code))
        if response.content != self.body:
            raise DeliveryMismatch(prepared.escrow_id, b"\x00" * 32, b"\x01" * 32)

    def validate(self, escrow_id: bytes, request: httpx.Request | None, response: httpx.Response) -> None:
        self.calls.append(("validate", response.content))


def seller(unavailable: int, body: bytes) -> tuple[list[str | None], httpx.MockTransport]:
    """A seller that asks for payment, answers the paid request `unavailable` times with its own 503, then
    delivers `body`; the list records each request's PAYMENT-SIGNATURE."""
    seen: list[str | None] = []
    extra = EscrowExtra(
        name="USDC", version="2", escrow=ADDRESS, operator=ADDRESS, request_hash=request_hash("GET", URL)
    )
    offer = EscrowRequirements(
        network="eip155:84532", amount=10_000, asset=ADDRESS, pay_to=ADDRESS, max_timeout_seconds=300, extra=extra
    )
    required = encode_payment_required(payment_required(URL, [offer.to_model()]))

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get(PAYMENT_SIGNATURE_HEADER))
        if seen[-1] is None:
            return httpx.Response(402, headers={PAYMENT_REQUIRED_HEADER: required})
        if sum(value is not None for value in seen) <= unavailable:
            error = {"error": Reason.DEPOSIT_PENDING.value, "message": "mining"}
            return httpx.Response(503, content=json.dumps(error).encode(), headers={"retry-after": "0"})
        return httpx.Response(200, content=body)

    return seen, httpx.MockTransport(answer)


def run(form: str, tmp_path: Path, transport: httpx.MockTransport, steps: Steps, **headers: str) -> httpx.Response:
    settings = BuyerSettings(dev(BUYER), "http://127.0.0.1:1", tmp_path / f"{form}.sqlite")
    if form == "sync":
        with EscrowClient(settings, transport=transport) as client:
            steps.real, client.auth.core = client.auth.core, steps  # type: ignore[assignment]
            return client.get(URL, headers=headers)

    async def go() -> httpx.Response:
        async with AsyncEscrowClient(settings, transport=transport) as client:
            steps.real, client.auth.core = client.auth.core, steps  # type: ignore[assignment]
            return await client.get(URL, headers=headers)

    return asyncio.run(go())


@pytest.mark.parametrize("form", ["sync", "async"])
def test_both_clients_pay_resend_and_judge_in_the_same_order(tmp_path: Path, form: str) -> None:
    steps = Steps(b"paid")
    seen, transport = seller(unavailable=2, body=b"paid")
    response = run(form, tmp_path, transport, steps)
    assert response.content == b"paid"
    # Unpaid once; then the one signed payment, the same each time: never a second signature.
    assert seen == [None, "signed-payment", "signed-payment", "signed-payment"]
    assert steps.calls == [
        ("prepare", 10_000),
        ("resend_after", (503, 0)),
        ("resend_after", (503, 1)),
        ("resend_after", (200, 2)),
        ("settle", 200),
        ("validate", b"paid"),
    ]


@pytest.mark.parametrize("form", ["sync", "async"])
def test_a_bad_delivery_raises_out_of_both_clients_and_is_not_validated(tmp_path: Path, form: str) -> None:
    steps = Steps(b"paid")
    _, transport = seller(unavailable=0, body=b"something else")
    with pytest.raises(DeliveryMismatch):
        run(form, tmp_path, transport, steps)
    assert [name for name, _ in steps.calls] == ["prepare", "resend_after", "settle"]


@pytest.mark.parametrize("form", ["sync", "async"])
def test_a_request_already_paid_is_sent_once_and_never_judged(tmp_path: Path, form: str) -> None:
    steps = Steps(b"paid")
    seen, transport = seller(unavailable=0, body=b"paid")
    response = run(form, tmp_path, transport, steps, **{PAYMENT_SIGNATURE_HEADER: "a replay"})
    assert response.status_code == 200 and seen == ["a replay"] and steps.calls == []
