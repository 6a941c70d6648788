"""delivery-escrow as a server scheme of the official x402 SDK (`SchemeNetworkServer`).

A seller on the SDK's own resource server registers it beside `exact`:

    server = x402ResourceServer([escrow_facilitator, exact_facilitator])
    server.register("eip155:84532", ExactEvmServerScheme())
    server.register("eip155:84532", DeliveryEscrowServerScheme())
    # routes: accepts=[PaymentOption(scheme="delivery-escrow", price="$0.01", ...), PaymentOption(scheme="exact", ...)]

and the SDK's middleware answers one 402 whose `accepts` holds both. This scheme fills in
what the SDK cannot: money prices resolved exactly to the token's atomic units (a price the
token cannot represent is refused, where the SDK truncates it), the token's EIP-712 domain,
the escrow and operator addresses, and, per request, the `requestHash` that binds the
payment to this method and URL (the SDK's adapters give no request body, so the hash binds
an empty body: price body-carrying routes with EscrowMiddleware instead). The facilitator
that verifies and deposits delivery-escrow payments must list `delivery-escrow` on the
network in its /supported, with `extra.operator` (and `extra.escrow` if it is not the
network's registered escrow).

Settling through this project's facilitator with the SDK's HTTPFacilitatorClient (x402-escrow
facilitator serve): a route whose offer says `extra={"settlement": "serve-first"}` runs the
SDK's default flow as serve-first (verify before the handler, settle after it with the delivery
hash, which the facilitator queues for settleMany); a route with `extra={"paymentFlow": "escrow"}`
is hold (the before-handler settle deposits, the after-handler one queues the delivery, and a
failed handler's cancel settle refunds). Add DeliveryHashHeader inside the SDK's middleware so
the after-handler settle carries the hash of the bytes served.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from x402.http.types import HTTPTransportContext
from x402.schemas import AssetAmount, PaymentRequirements, SupportedKind

from escrow_py.chain.registry import KnownToken, resolve_escrow
from escrow_py.protocol.codec import setting_address
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.terms import canonical_url, delivery_hash, request_hash
from escrow_py.protocol.wire import SCHEME
from escrow_py.seller._price import atomic_amount, token_for

# The SDK's sentinel for "no asset transfer method on the wire".
_DEFAULT_TRANSFER = "default"
# The response header DeliveryHashHeader sets and the scheme reads (lower case: ASGI header names).
DELIVERY_HASH_HEADER = "x-delivery-hash"
# The key a cancel-phase settle payload carries (the SDK's phase "cancel"): the facilitator refunds the deposit.
CANCEL_KEY = "refund"


class DeliveryEscrowServerScheme:
    """The SDK's `SchemeNetworkServer` for delivery-escrow (x402.interfaces), for x402ResourceServer.register.

    `escrow` and `operator` default to what the facilitator's /supported says for the network
    (`extra.escrow`, `extra.operator`), then to the network's registered escrow. `token`
    overrides the SDK's default asset for money prices (another token; its domain is
    `token_name`/`token_version`, or the SDK table's where it knows the token).
    """

    scheme = SCHEME
    default_asset_transfer_method = _DEFAULT_TRANSFER
    # The buyer signs one ReceiveWithAuthorization; the facilitator deposits it. No `paymentFlow`
    # goes on the wire for the default flow, so an SDK client with both plugins takes the offers
    # in the seller's order (with `escrow` it would prefer exact).
    payment_flows: ClassVar[dict[str, Any]] = {
        _DEFAULT_TRANSFER: {"supported": ("authorization", "escrow"), "default": "authorization"}
    }

    def __init__(
        self,
        *,
        escrow: str | None = None,
        operator: str | None = None,
        token: str | None = None,
        token_name: str = "",
        token_version: str = "",
    ) -> None:
        self.escrow, self.operator, self.token = (
            None if value is None else setting_address(value, f"DeliveryEscrowServerScheme {name}")
            for name, value in (("escrow", escrow), ("operator", operator), ("token", token))
        )
        self.token_domain = (token_name, token_version)

    def _token(self, network: str) -> KnownToken:
        return token_for(network, self.token or "", *self.token_domain)

    def parse_price(self, price: Any, network: str) -> AssetAmount:
        """Money or an asset amount, in exact atomic units of the network's token (ConfigError if it can't be)."""
        token = self._token(network)
        if isinstance(price, (AssetAmount, dict)):
            data = price.model_dump(exclude_none=True) if isinstance(price, AssetAmount) else price
            asset = data.get("asset")
            if asset is not None and setting_address(asset, "price asset") != token.address:
                name, version = (data.get("extra") or {}).get("name"), (data.get("extra") or {}).get("version")
                if not isinstance(name, str) or not isinstance(version, str):
                    raise ConfigError(f"price in token {asset} needs extra.name and extra.version (its EIP-712 domain)")
                token = token_for(network, asset, name, version)
        amount = atomic_amount(price, token, network)
        return AssetAmount(
            amount=str(amount), asset=token.address, extra={"name": token.name, "version": token.version}
        )

    def enhance_payment_requirements(
        self, requirements: PaymentRequirements, supported_kind: SupportedKind, extensions: list[str]
    ) -> PaymentRequirements:
        """Add the escrow and operator (from this scheme, else the facilitator's /supported extra)."""
        offered = supported_kind.extra or {}
        escrow = self.escrow or offered.get("escrow")
        if escrow is None:
            escrow = resolve_escrow(requirements.network).escrow
        operator = self.operator or offered.get("operator")
        if operator is None:
            raise ConfigError(
                f"no operator for delivery-escrow on {requirements.network}: the facilitator's /supported "
                "names none (extra.operator); pass operator= to DeliveryEscrowServerScheme"
            )
        requirements.extra.setdefault("escrow", setting_address(escrow, f"escrow on {requirements.network}"))
        requirements.extra.setdefault("operator", setting_address(operator, "the facilitator's /supported operator"))
        return requirements

    def enrich_payment_required_response(self, ctx: Any) -> list[PaymentRequirements] | None:
        """Per request: the requestHash of this method and URL on each delivery-escrow offer.

        The SDK builds the 402 again for the paid request and matches the payment against it,
        so a payment signed for another request finds no matching offer.
        """
        transport = ctx.transport_context
        request = getattr(transport, "request", None)
        if not isinstance(transport, HTTPTransportContext) or request is None:
            return None
        digest = "0x" + request_hash(request.method, canonical_url(request.adapter.get_url()), b"").hex()
        for offer in ctx.requirements:
            if offer.scheme == SCHEME:
                offer.extra["requestHash"] = digest
        return list(ctx.requirements)

    def enrich_settlement_payload(self, ctx: Any) -> dict[str, Any] | None:
        """After the handler, the delivery hash of the body served: from the body where the transport gives
        it, else from the `X-Delivery-Hash` header DeliveryHashHeader put on the response (the SDK's
        own FastAPI middleware hands a scheme the response's headers, never its body)."""
        transport = ctx.transport_context
        if ctx.phase == "cancel":
            return {CANCEL_KEY: "handler_failed"}  # settle_on_cancel: the facilitator refunds the deposit
        if ctx.phase != "after-handler":
            return None
        body = getattr(transport, "response_body", None)
        if body is not None:
            raw = body if isinstance(body, bytes) else str(body).encode("utf-8")
            return {"deliveryHash": "0x" + delivery_hash(raw).hex()}
        headers = getattr(transport, "response_headers", None) or {}
        hashed = next((str(v) for k, v in headers.items() if str(k).lower() == DELIVERY_HASH_HEADER), None)
        if hashed is None or re.fullmatch(r"0x[0-9a-fA-F]{64}", hashed) is None:
            return None
        return {"deliveryHash": hashed.lower()}

    def settle_on_cancel(self, ctx: Any) -> PaymentRequirements | None:
        """The handler failed after the `escrow` flow's deposit: settle once more, marked as a refund
        (enrich_settlement_payload adds the mark), so the facilitator returns the buyer's money now."""
        return ctx.requirements if "before-handler" in tuple(ctx.settled_phases or ()) else None


class DeliveryHashHeader:
    """ASGI middleware for a seller on the SDK's own FastAPI middleware: puts the delivery hash of each
    successful response's body in an `X-Delivery-Hash` header, where the scheme's after-handler settle
    can read it (DeliveryEscrowServerScheme.enrich_settlement_payload).

    Add it before the SDK's PaymentMiddlewareASGI (`app.add_middleware(DeliveryHashHeader)` first), so it
    wraps the handler and the SDK's middleware wraps it: the hash is then over exactly the bytes the
    SDK's middleware sends. The body is buffered (a response below 400 is hashed whole before it leaves).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def hashing(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                if int(message["status"]) >= 400:
                    start = None
                    await send(message)  # not a sale: no settlement, nothing to commit
                    return
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.append(bytes(message.get("body", b"")))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers += [(b"content-length", str(len(body)).encode()),
                        (DELIVERY_HASH_HEADER.encode(), ("0x" + delivery_hash(body).hex()).encode())]  # fmt: skip
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, hashing)


__all__ = ["CANCEL_KEY", "DELIVERY_HASH_HEADER", "DeliveryEscrowServerScheme", "DeliveryHashHeader"]
