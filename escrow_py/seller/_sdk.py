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
"""

from __future__ import annotations

from typing import Any, ClassVar

from eth_utils.address import is_address, to_checksum_address
from x402.http.types import HTTPTransportContext
from x402.schemas import AssetAmount, PaymentRequirements, SupportedKind

from escrow_py.chain.registry import KnownToken, resolve_escrow
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.terms import canonical_url, delivery_hash, request_hash
from escrow_py.protocol.wire import SCHEME
from escrow_py.seller._price import atomic_amount, token_for

# The SDK's sentinel for "no asset transfer method on the wire".
_DEFAULT_TRANSFER = "default"


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
        for name, value in (("escrow", escrow), ("operator", operator), ("token", token)):
            if value is not None and not is_address(value):
                raise ConfigError(f"DeliveryEscrowServerScheme {name} must be an address, got {value!r}")
        self.escrow = to_checksum_address(escrow) if escrow else None
        self.operator = to_checksum_address(operator) if operator else None
        self.token = to_checksum_address(token) if token else None
        self.token_domain = (token_name, token_version)

    def _token(self, network: str) -> KnownToken:
        return token_for(network, self.token or "", *self.token_domain)

    def parse_price(self, price: Any, network: str) -> AssetAmount:
        """Money or an asset amount, in exact atomic units of the network's token (ConfigError if it can't be)."""
        token = self._token(network)
        if isinstance(price, (AssetAmount, dict)):
            data = price.model_dump(exclude_none=True) if isinstance(price, AssetAmount) else price
            asset = data.get("asset")
            if isinstance(asset, str) and is_address(asset) and to_checksum_address(asset) != token.address:
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
        if not isinstance(operator, str) or not is_address(operator):
            raise ConfigError(
                f"no operator for delivery-escrow on {requirements.network}: the facilitator's /supported "
                "names none (extra.operator); pass operator= to DeliveryEscrowServerScheme"
            )
        requirements.extra.setdefault("escrow", to_checksum_address(escrow))
        requirements.extra.setdefault("operator", to_checksum_address(operator))
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
        """After the handler, the delivery hash of the body served, where the transport gives it."""
        transport = ctx.transport_context
        body = getattr(transport, "response_body", None)
        if ctx.phase != "after-handler" or body is None:
            return None
        raw = body if isinstance(body, bytes) else str(body).encode("utf-8")
        return {"deliveryHash": "0x" + delivery_hash(raw).hex()}


__all__ = ["DeliveryEscrowServerScheme"]
