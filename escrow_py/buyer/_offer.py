"""Step 1, the offer: the delivery-escrow option of a 402, and the request it asks the buyer to pay for.

Pure: reads a response and a request, never the chain or the disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from x402.schemas import PaymentRequired, PaymentRequirements

from escrow_py.buyer._errors import PaymentRefused, RequestHashMismatch
from escrow_py.protocol.errors import ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import canonical_url, request_hash
from escrow_py.protocol.wire import (
    PAYMENT_REQUIRED_HEADER,
    PAYMENT_SIGNATURE_HEADER,
    SCHEME,
    EscrowRequirements,
    decode_payment_required,
)

# Headers never written to the journal: credentials, and those httpx recomputes on replay.
_UNJOURNALED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        PAYMENT_SIGNATURE_HEADER.lower(),
    }
)


@dataclass(frozen=True, slots=True)
class Offer:
    """The delivery-escrow option of a 402, with the envelope it came in."""

    required: PaymentRequired
    model: PaymentRequirements
    requirements: EscrowRequirements


@dataclass(frozen=True, slots=True)
class Bound:
    """The request an offer is for, as the journal keeps it: where a replay connects to (`url`) and
    the requestHash the seller computed from the request as it went over the wire."""

    url: str
    request_hash: bytes


def find_offer(response: httpx.Response) -> Offer | None:
    """The delivery-escrow option of a 402; None if the response offers none (not ours to pay)."""
    if response.status_code != 402:
        return None
    value = response.headers.get(PAYMENT_REQUIRED_HEADER)
    if value is None:
        return None
    try:
        required = decode_payment_required(value)
    except ProtocolError as exc:
        raise PaymentRefused(Reason.INVALID_PAYMENT_REQUIRED, str(exc)) from None
    for model in required.accepts:
        if model.scheme == SCHEME:
            try:
                return Offer(required, model, EscrowRequirements.from_model(model))
            except ProtocolError as exc:
                raise PaymentRefused(Reason.INVALID_REQUIREMENTS, str(exc)) from None
    return None


def bind(request: httpx.Request, offer: Offer) -> Bound:
    """The request the offer asks to pay for, if it is this one: raises RequestHashMismatch when the 402's
    requestHash is another request's, PaymentRefused (invalid_url) when the URL has no canonical form."""
    try:
        url = canonical_url(str(request.url))  # where a replay connects to
        hashed = canonical_url(wire_url(request))  # what the seller hashes: the same unless Host was set
    except ValueError:
        # Not quoted: the URL's userinfo is a credential.
        raise PaymentRefused(
            Reason.INVALID_URL,
            f"the {request.method} URL to host {request.url.host!r} has no canonical form (credentials in the "
            "URL, or a host that is not plain ASCII), so no requestHash can bind it",
        ) from None
    expected = request_hash(request.method, hashed, request.content)
    offered = offer.requirements.extra.request_hash
    if expected != offered:
        raise RequestHashMismatch(expected, offered, request.method, hashed)
    return Bound(url, expected)


def journal_headers(request: httpx.Request) -> dict[str, str]:
    """The request headers a replay needs, without credentials.

    A Host header the caller chose (virtual hosting: another name than the URL's) is kept: the seller
    hashes the URL from it, so a replay without it would be another request.
    """
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _UNJOURNALED_HEADERS}
    host = request.headers.get("host")
    if host is not None and host != request.url.netloc.decode("ascii"):
        headers["host"] = host
    return headers


def wire_url(request: httpx.Request) -> str:
    """The URL as the request carries it over the wire: scheme, the Host header as sent, the raw target.

    What the seller hashes (terms.canonical_url of its scheme, Host and raw path), so both sides
    canonicalise the same bytes: httpx's percent-encoded path and query, and a Host header that
    may name another host than the URL's.
    """
    host = request.headers.get("host") or request.url.netloc.decode("ascii")
    return f"{request.url.scheme}://{host}{request.url.raw_path.decode('ascii')}"
