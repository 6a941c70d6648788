"""The one body of a paid request, sans-IO: a generator that says what to send and judges what comes back.

`payment_flow` never sends, sleeps or awaits; it yields a `Send` (a request, and how long to wait before
it) and is handed the answer. Two drivers run it, as httpx.Auth runs its own flows: `drive` for blocking
code (EscrowAuth's sync flow, so EscrowClient) and `adrive` for async code (EscrowAuth's async flow, so
AsyncEscrowClient, and the MCP client, which carries each request as a tool call). The steps between two
sends block on the chain and the disk, so `adrive` runs them in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass

import httpx

from escrow_py.buyer._core import PaymentCore, Prepared
from escrow_py.buyer._errors import PaymentNotDelivered
from escrow_py.buyer._offer import find_offer
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER

# The paid request carries its payment here, so a transport failure can say which payment it left in flight.
PAYMENT_EXTENSION = "x402_escrow_payment"
# ... and the URL it pays for: httpx copies a request's extensions onto each redirect hop it builds, so a hop
# knows the one URL its payment header may go to (keep_payment_on_its_url).
PAID_URL_EXTENSION = "x402_escrow_paid_url"

log = logging.getLogger("escrow_py.buyer")


@dataclass(frozen=True, slots=True)
class Send:
    """Send `request` after waiting `after` seconds (a resend after the seller's Retry-After); hand back the
    answer, its body read."""

    request: httpx.Request
    after: float = 0.0


Flow = Generator[Send, httpx.Response, None]


def payment_flow(core: PaymentCore, request: httpx.Request) -> Flow:
    """Send the request; pay a delivery-escrow 402 (offer → decide → sign → journal), send it again with
    the payment (and again after each 503 of the seller's own, within the ResendPolicy), then judge the
    answer: returns when it is the delivery paid for, raises the PaymentError that says where the money is."""
    if PAYMENT_SIGNATURE_HEADER in request.headers:
        yield Send(request)  # already paid (a replay): not ours to pay again
        return
    response = yield Send(request)
    offer = find_offer(response)
    if offer is None:
        return
    prepared = core.prepare(request, offer)
    request.headers[PAYMENT_SIGNATURE_HEADER] = prepared.header
    request.extensions[PAYMENT_EXTENSION] = prepared
    request.extensions[PAID_URL_EXTENSION] = request.url
    response = _paid_answer(request, (yield Send(request)))
    resent = 0
    while (wait := core.resend_after(prepared, response, resent)) is not None:
        # The seller's own 503: the same request, the same signed payment, again; never a new one.
        resent += 1
        response = _paid_answer(request, (yield Send(request, after=wait)))
    core.settle(prepared, response)
    core.validate(prepared.escrow_id, request, response)


def keep_payment_on_its_url(request: httpx.Request) -> None:
    """An httpx request event hook: a redirect hop to any URL but the one paid for goes without PAYMENT-SIGNATURE.

    httpx follows a redirect inside each send of an auth flow and builds the hop from the paid request's headers
    (it strips only Authorization, and only across origins), so without this the next host would get the
    payment header: a bearer token for the delivery. Request hooks run for every hop, before it is sent.
    """
    paid_url = request.extensions.get(PAID_URL_EXTENSION)
    if paid_url is not None and request.url != paid_url and PAYMENT_SIGNATURE_HEADER in request.headers:
        del request.headers[PAYMENT_SIGNATURE_HEADER]


async def akeep_payment_on_its_url(request: httpx.Request) -> None:
    """keep_payment_on_its_url for httpx.AsyncClient, which awaits its event hooks."""
    keep_payment_on_its_url(request)


def _paid_answer(request: httpx.Request, response: httpx.Response) -> httpx.Response:
    """The seller's answer to the paid request itself: `response`, or, when the client followed a redirect, the
    redirect it answered with (what the seller charged for and committed to; the hops after it are other
    requests). Warns if the payment header went along on a hop: the client lacks keep_payment_on_its_url."""
    if not response.history:
        return response
    chain = [*response.history, response]
    for hop in chain:
        if hop.request is not request and PAYMENT_SIGNATURE_HEADER in hop.request.headers:
            log.warning(
                "the payment for %s went along with a redirect to %s: install EscrowAuth.request_hook as the "
                "client's first request event hook", request.url, hop.request.url,
            )  # fmt: skip
    # The flow sends one request object again and again (unpaid, paid, resent): its last answer is this send's.
    return next((hop for hop in reversed(chain) if hop.request is request), response)


def drive(flow: Flow) -> Generator[httpx.Request, httpx.Response, None]:
    """Run a flow from blocking code: an httpx sync auth flow (httpx sends what it yields)."""
    try:
        step = next(flow)
        while True:
            if step.after:
                time.sleep(step.after)
            response = yield step.request
            response.read()
            step = flow.send(response)
    except StopIteration:
        return


async def adrive(flow: Flow) -> AsyncGenerator[httpx.Request, httpx.Response]:
    """Run a flow from async code: an httpx async auth flow, or any caller that asends the answers."""
    step: Send | None = next(flow)  # nothing blocks before the first send
    while step is not None:
        if step.after:
            await asyncio.sleep(step.after)
        response = yield step.request
        await response.aread()
        # Chain reads, signing and the journal's fsync block: keep them off the event loop.
        step = await asyncio.to_thread(_advance, flow, response)


def _advance(flow: Flow, response: httpx.Response) -> Send | None:
    """The flow's next send, None when it is done (StopIteration cannot cross a thread's future)."""
    try:
        return flow.send(response)
    except StopIteration:
        return None


def lost_payment(request: httpx.Request, failure: str, exc: BaseException) -> PaymentNotDelivered | None:
    """The typed error for a request whose `failure` (what broke) came after its signed payment was sent;
    None if the request carried no payment of this buyer's."""
    prepared = request.extensions.get(PAYMENT_EXTENSION)
    if not isinstance(prepared, Prepared):
        return None
    return PaymentNotDelivered(
        prepared.escrow_id,
        prepared.terms.deadline,
        f"the {failure} failed after the signed payment was sent ({type(exc).__name__}: {exc}); "
        "the journal has it: recover() replays it or refunds it",
        escrow=prepared.escrow,
    )


def lost_in_flight(exc: httpx.TransportError) -> PaymentNotDelivered | None:
    """The typed error for a connection that failed after a signed payment was sent; None if none was."""
    try:
        request = exc.request
    except RuntimeError:  # httpx raises when the error carries no request
        return None
    return lost_payment(request, "connection", exc)
