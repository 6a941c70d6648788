"""The seller's place in the x402 SDK's world: money and dynamic prices, `exact` beside
delivery-escrow in one 402, bazaar discovery, and verify/settle hooks.

The middleware (`_middleware.py`) asks this module, per request, for everything a priced request
is offered at once (`Offers.paid_request`: its canonical URL, price, payTo, delivery-escrow
requirements, the 402's accepts and extensions), built from:

- the price and payTo (`Offers.terms_of`): a route's `amount`, or its `price` resolved like
  the SDK's (money, asset amount, or a callable of the request's HTTPRequestContext), and
  its `pay_to` (an address or such a callable);
- the `accepts` list in the seller's order (`Offers.accepts`): delivery-escrow, and the SDK's
  `exact` built by the SDK's own resource server when SellerConfig.exact is set;
- the bazaar extension of the 402 (`Offers.extensions`);
- the whole `exact` payment (`Offers.pay_exact`): matched, verified and settled through the
  SDK's x402ResourceServer and the seller's facilitator, exactly as the SDK's middleware does;
- the hooks around a delivery-escrow payment (`SellerHooks`).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import anyio.to_thread
from eth_typing import ChecksumAddress
from x402 import x402ResourceServer
from x402.http import HTTPRequestContext
from x402.http.types import HTTPTransportContext
from x402.schemas import (
    AbortResult,
    AssetAmount,
    PaymentAbortedError,
    PaymentPayload,
    PaymentRequirements,
    ResourceConfig,
    SettleContext,
    SettlePhase,
    SettleResponse,
    SettleResultContext,
    VerifyContext,
    VerifyResponse,
    VerifyResultContext,
)

from escrow_py.chain.registry import KnownToken
from escrow_py.protocol.codec import setting_address
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.terms import canonical_url
from escrow_py.protocol.wire import PAYMENT_SIGNATURE_HEADER, SCHEME, EscrowRequirements
from escrow_py.seller._price import atomic_amount, token_for
from escrow_py.seller._verify import offer_for

if TYPE_CHECKING:
    from escrow_py.seller._config import PricedRoute, SellerConfig
    from escrow_py.seller._store import StoredResponse

log = logging.getLogger("escrow_py.seller")

EXACT = "exact"
_SIGNATURE_HEADER = PAYMENT_SIGNATURE_HEADER.lower().encode()
SCHEMES = frozenset({SCHEME, EXACT})

Hook = Callable[[Any], Any]
_T = TypeVar("_T")
# Seconds before a facilitator whose /supported failed is asked again.
EXACT_RETRY = 10.0


@dataclass(frozen=True, slots=True)
class ExactOffer:
    """Also offer the SDK's `exact` scheme on priced routes, settled by `facilitator`.

    `facilitator` is anything with the SDK's FacilitatorClient shape: an
    `x402.http.HTTPFacilitatorClient(FacilitatorConfig(url=...))`, or an in-process
    `x402.x402Facilitator`. `first` lists exact before delivery-escrow in the 402 (an SDK
    client with both plugins takes the first it can pay; a stock client pays exact wherever
    it stands). A route's `schemes` overrides the order, or leaves exact out. Give each app its
    own facilitator client: the SDK's HTTPFacilitatorClient binds to the event loop that first
    uses it.
    """

    facilitator: Any
    first: bool = False

    def __post_init__(self) -> None:
        for name in ("get_supported", "verify", "settle"):
            if not callable(getattr(self.facilitator, name, None)):
                raise ConfigError(f"ExactOffer.facilitator must be an x402 FacilitatorClient (no {name}())")

    @property
    def order(self) -> tuple[str, ...]:
        return (EXACT, SCHEME) if self.first else (SCHEME, EXACT)


class SellerHooks:
    """Verify and settle hooks like the SDK's x402ResourceServer's, for both schemes.

        hooks = SellerHooks().on_before_verify(deny_listed).on_after_settle(book)
        SellerConfig(..., hooks=hooks)

    A hook is a sync or async callable of the SDK's context (`x402.schemas.VerifyContext`,
    `VerifyResultContext`, `SettleContext`, `SettleResultContext`): `payment_payload`,
    `requirements`, `transport_context` (an HTTPTransportContext whose `request` is the
    request's HTTPRequestContext) and, after, `result`. A before-hook (or after-verify) may
    return `AbortResult(reason, message)`: the buyer gets a 402 whose `error` is the reason.
    After-settle hooks are for bookkeeping: what they return is ignored, and on delivery-escrow
    one that raises is logged and the sale goes on (the deposit has landed). Register hooks
    before the app starts: exact's resource server takes them when it is built.

    On `exact` the SDK runs them as it always does. On delivery-escrow, "verify" is the
    off-chain check of the signed payment and "settle" the on-chain checks and the deposit
    (phase "before-handler"): an abort before settle happens before any money moves and
    before the handler runs. The SDK's Skip…/Recovered… results are for exact only.
    """

    def __init__(self) -> None:
        self.before_verify: list[Hook] = []
        self.after_verify: list[Hook] = []
        self.before_settle: list[Hook] = []
        self.after_settle: list[Hook] = []

    def on_before_verify(self, hook: Hook) -> SellerHooks:
        self.before_verify.append(hook)
        return self

    def on_after_verify(self, hook: Hook) -> SellerHooks:
        self.after_verify.append(hook)
        return self

    def on_before_settle(self, hook: Hook) -> SellerHooks:
        self.before_settle.append(hook)
        return self

    def on_after_settle(self, hook: Hook) -> SellerHooks:
        self.after_settle.append(hook)
        return self

    def install(self, server: x402ResourceServer) -> None:
        """Register every hook on the SDK's resource server that settles `exact`."""
        registrations: list[tuple[Callable[[Any], Any], list[Hook]]] = [
            (server.on_before_verify, self.before_verify),
            (server.on_after_verify, self.after_verify),
            (server.on_before_settle, self.before_settle),
            (server.on_after_settle, self.after_settle),
        ]
        for register, hooks in registrations:
            for hook in hooks:
                register(hook)

    async def after_settled(
        self,
        payload: PaymentPayload,
        requirements: PaymentRequirements,
        result: SettleResponse,
        escrow_id: bytes,
        *,
        context: HTTPRequestContext | None = None,
        phase: SettlePhase = "before-handler",
    ) -> None:
        """Run the after-settle hooks, for bookkeeping: what they return is ignored, and one that raises is
        logged with the escrow id; the settlement it reports stays recorded and is never sent again.
        `context` None: run by the settlement worker, after the request has gone (no transport context)."""
        if not self.after_settle:
            return
        settled = SettleResultContext(
            payment_payload=payload,
            requirements=requirements,
            transport_context=None if context is None else _transport(context),
            phase=phase,
            result=result,
        )
        try:
            await SellerHooks.run(self.after_settle, settled)
        except Exception:
            log.exception("an after-settle hook raised for escrow 0x%s; the settlement stands", escrow_id.hex())

    @staticmethod
    async def run(hooks: list[Hook], context: Any) -> AbortResult | None:
        """Run `hooks` in order; the first AbortResult stops them and is returned."""
        for hook in hooks:
            result = await _maybe_await(hook(context))
            if isinstance(result, AbortResult):
                return result
            if result is not None:
                log.warning("a seller hook returned %r, which delivery-escrow ignores", type(result).__name__)
        return None


def check_route_prices(route: PricedRoute) -> None:
    """A PricedRoute's price settings on their own (the network-dependent part waits for SellerConfig)."""
    where = f"PricedRoute {route.method} {route.path}"
    amount = route.amount
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ConfigError(f"{where}: amount must be a positive integer (atomic units), got {amount!r}")
    if (amount > 0) == (route.price is not None):
        raise ConfigError(f"{where}: give exactly one of amount (atomic units) and price ('$0.01', ...)")
    if route.pay_to is not None and not callable(route.pay_to):
        object.__setattr__(route, "pay_to", setting_address(route.pay_to, f"{where}: pay_to (or a callable)"))
    if route.schemes is not None:
        schemes = tuple(route.schemes)
        if not schemes or len(set(schemes)) != len(schemes) or not set(schemes) <= SCHEMES or SCHEME not in schemes:
            raise ConfigError(
                f"{where}: schemes must order {SCHEME!r} and optionally {EXACT!r}, each once, got {route.schemes!r}"
            )
        object.__setattr__(route, "schemes", schemes)
    if route.discovery is None:
        return
    # The SDK's bazaar (with jsonschema, about 0.15 s of CPU at import) is loaded by the routes that declare
    # discovery only: a seller without discovery, and every replica and test process, does not pay for it.
    from x402.extensions.bazaar import BAZAAR

    if not isinstance(route.discovery, Mapping) or not isinstance(route.discovery.get(BAZAAR.key), Mapping):
        raise ConfigError(f"{where}: discovery must be declare_discovery_extension(...)'s result")


def resolve_route_prices(config: SellerConfig, routes: tuple[PricedRoute, ...]) -> tuple[PricedRoute, ...]:
    """Routes with every fixed price in atomic units of the seller's token, checked when the config is built."""
    token = token_for(config.network, config.token, config.token_name, config.token_version)
    resolved = []
    for route in routes:
        if route.schemes is not None and EXACT in route.schemes and config.exact is None:
            raise ConfigError(f"route {route.method} {route.path} offers exact, but SellerConfig.exact is not set")
        if route.price is not None and not callable(route.price):
            try:
                amount = atomic_amount(route.price, token, config.network)
            except ConfigError as exc:
                raise ConfigError(f"route {route.method} {route.path}: {exc}") from None
            resolved.append(replace(route, amount=amount, price=None))
        else:
            resolved.append(route)
    return tuple(resolved)


class ScopeAdapter:
    """The SDK's HTTPAdapter over an ASGI scope (what dynamic prices, hooks and bazaar read)."""

    def __init__(self, scope: Mapping[str, Any], url: str) -> None:
        self._scope = scope
        self._url = url

    def get_header(self, name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for key, value in self._scope.get("headers", []):
            if bytes(key).lower() == wanted:
                return bytes(value).decode("latin-1")
        return None

    def get_method(self) -> str:
        return str(self._scope["method"]).upper()

    def get_path(self) -> str:
        return str(self._scope["path"])

    def get_url(self) -> str:
        return self._url

    def get_accept_header(self) -> str:
        return self.get_header("accept") or ""

    def get_user_agent(self) -> str:
        return self.get_header("user-agent") or ""

    def get_query_params(self) -> dict[str, str | list[str]]:
        parsed = parse_qs(urlsplit(self._url).query, keep_blank_values=True)
        return {k: v[0] if len(v) == 1 else v for k, v in parsed.items()}

    def get_query_param(self, name: str) -> str | list[str] | None:
        return self.get_query_params().get(name)

    def get_body(self) -> Any:
        return None


def request_context(scope: Mapping[str, Any], url: str, route: PricedRoute, header: str | None) -> HTTPRequestContext:
    """The SDK's HTTPRequestContext of a request to `route` (route_pattern in the SDK's `:param` form)."""
    pattern = route.path.replace(":path}", "}").replace("{", ":").replace("}", "")
    return HTTPRequestContext(
        adapter=ScopeAdapter(scope, url),
        path=str(scope["path"]),
        method=str(scope["method"]).upper(),
        payment_header=header,
        route_pattern=pattern,
    )


def header_of(scope: Mapping[str, Any], name: bytes) -> str | None:
    """A request header's value (`name` in lower case), the first if repeated."""
    for key, value in scope.get("headers", []):
        if bytes(key).lower() == name:
            return bytes(value).decode("latin-1")
    return None


def resource_url(scope: Mapping[str, Any], public_base_url: str | None) -> str:
    """The canonical URL of this request as it went over the wire (terms.canonical_url)."""
    root = str(scope.get("root_path", "")).encode("utf-8")
    # raw_path is the request target exactly as sent; `path` is already percent-decoded.
    target = scope.get("raw_path") or str(scope["path"]).encode("utf-8")
    if root and not target.startswith(root):
        target = root + target
    if public_base_url is not None:
        base = public_base_url.encode("utf-8")
    else:
        host = header_of(scope, b"host")
        if host is None:
            server = scope.get("server") or ("localhost", None)
            host = server[0] if server[1] is None else f"{server[0]}:{server[1]}"
        base = f"{scope.get('scheme', 'http')}://{host}".encode("latin-1")
    query = bytes(scope.get("query_string", b""))
    return canonical_url(base + target + (b"?" + query if query else b""))


@dataclass(frozen=True, slots=True)
class PaidRequest:
    """A request to a priced route and what it is offered: the facts the payment is judged against."""

    method: str
    url: str
    body: bytes
    header: str | None  # PAYMENT-SIGNATURE as sent (None: no payment yet)
    route: PricedRoute
    offer: EscrowRequirements
    # The SDK's view of the request, and the 402's offers in the seller's order.
    context: HTTPRequestContext
    accepts: list[PaymentRequirements]
    extensions: dict[str, Any] | None


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


@dataclass(frozen=True, slots=True)
class ExactOutcome:
    """How an `exact` payment ended: refused (402 `error`), facilitator down (`unavailable`), or served."""

    error: str | None = None
    unavailable: bool = False
    response: StoredResponse | None = None
    settle: SettleResponse | None = None


class Offers:
    """Per-middleware: the seller's token, its SDK resource server for exact (built on first use)."""

    def __init__(self, config: SellerConfig) -> None:
        self.config = config
        self.token: KnownToken = token_for(config.network, config.token, config.token_name, config.token_version)
        self._server: x402ResourceServer | None = None
        self._server_lock = asyncio.Lock()
        self._retry_at = 0.0

    async def paid_request(self, scope: Mapping[str, Any], route: PricedRoute, body: bytes) -> PaidRequest:
        """Everything this request is offered, and its payment header; ConfigError if a dynamic price or
        payTo gives a bad one."""
        config = self.config
        header = header_of(scope, _SIGNATURE_HEADER)
        method = str(scope["method"]).upper()
        url = resource_url(scope, config.public_base_url)
        context = request_context(scope, url, route, header)
        amount, pay_to = await self.terms_of(route, context)
        offer = offer_for(
            network=config.network,
            amount=amount,
            asset=config.token,
            pay_to=pay_to,
            escrow=config.escrow,
            operator=config.operator.address,
            token_name=config.token_name,
            token_version=config.token_version,
            max_timeout_seconds=route.max_timeout_seconds,
            method=method,
            resource_url=url,
            body=body,
            settlement=route.settlement,  # type: ignore[arg-type]  # PricedRoute made it a SettlementMode
        )
        accepts = await self.accepts(route, offer.to_model(), amount, pay_to)
        return PaidRequest(method, url, body, header, route, offer, context, accepts, self.extensions(route, context))

    # -- price and payTo -------------------------------------------------------------------

    async def terms_of(self, route: PricedRoute, context: HTTPRequestContext) -> tuple[int, ChecksumAddress]:
        """This request's price (atomic units) and payTo; ConfigError if a callable gives a bad one."""
        amount = route.amount
        if route.price is not None:  # a callable: fixed prices were resolved when the config was built
            price = await _maybe_await(route.price(context))  # type: ignore[operator]
            amount = atomic_amount(price, self.token, self.config.network)
        pay_to: Any = route.pay_to if route.pay_to is not None else self.config.pay_to
        if callable(pay_to):
            pay_to = await _maybe_await(pay_to(context))
        return amount, setting_address(pay_to, f"route {route.method} {route.path}: pay_to")

    # -- the 402 ---------------------------------------------------------------------------

    def schemes_of(self, route: PricedRoute) -> tuple[str, ...]:
        if route.schemes is not None:
            return route.schemes
        return self.config.exact.order if self.config.exact is not None else (SCHEME,)

    async def accepts(
        self, route: PricedRoute, escrow_offer: PaymentRequirements, amount: int, pay_to: str
    ) -> list[PaymentRequirements]:
        """The 402's `accepts` in the route's order; exact is left out (logged) while its facilitator is down."""
        accepts: list[PaymentRequirements] = []
        for scheme in self.schemes_of(route):
            if scheme == SCHEME:
                accepts.append(escrow_offer)
                continue
            try:
                accepts.append(await self._exact_requirements(route, amount, pay_to))
            except Exception as exc:  # noqa: BLE001 - whatever the facilitator's /supported did, escrow still sells
                log.warning("exact left out of the 402: the facilitator failed (%s)", type(exc).__name__)
        return accepts

    def extensions(self, route: PricedRoute, context: HTTPRequestContext) -> dict[str, Any] | None:
        """The bazaar extension of this route's 402, enriched as the SDK's middleware does, with the
        settlement mode of its delivery-escrow offer under `info.settlement`."""
        if route.discovery is None:
            return None
        from x402.extensions.bazaar import BAZAAR, bazaar_resource_server_extension  # discovery only (see above)

        declaration = copy.deepcopy(dict(route.discovery[BAZAAR.key]))
        enriched = bazaar_resource_server_extension.enrich_declaration(declaration, context)
        enriched.setdefault("info", {})["settlement"] = "hold"
        return {BAZAAR.key: enriched}

    # -- exact -----------------------------------------------------------------------------

    async def _resource_server(self) -> x402ResourceServer:
        """The SDK's resource server for exact, initialized from the facilitator's /supported once it answers.

        After a failure it is not asked again for EXACT_RETRY seconds: a facilitator that hangs
        must not hold up every 402 (they offer delivery-escrow alone meanwhile).
        """
        async with self._server_lock:
            if self._server is None:
                if time.monotonic() < self._retry_at:
                    raise ConnectionError("the exact facilitator failed recently; not asked again yet")
                exact = self.config.exact
                assert exact is not None
                # Imported by the sellers that offer exact only: the others never load the SDK's EVM scheme.
                from x402.mechanisms.evm.exact import ExactEvmServerScheme

                server = x402ResourceServer(exact.facilitator)
                server.register(self.config.network, ExactEvmServerScheme())  # type: ignore[no-untyped-call, arg-type]
                if self.config.hooks is not None:
                    self.config.hooks.install(server)
                try:  # initialize() asks the facilitator's /supported synchronously (an HTTP call)
                    await anyio.to_thread.run_sync(server.initialize)
                except Exception:
                    self._retry_at = time.monotonic() + EXACT_RETRY
                    raise
                self._server = server
            return self._server

    async def startup_failure(self) -> str | None:
        """At start: a facilitator that answers but does not settle exact on the seller's network is a
        configuration error (the SDK's middleware exits on it); one that does not answer is only logged."""
        if self.config.exact is None:
            return None
        try:
            server = await self._resource_server()
        except Exception as exc:  # noqa: BLE001 - any failure to reach it: escrow sells, exact waits
            log.warning("the exact facilitator did not answer at start (%s); exact is offered once it does", exc)
            return None
        if server.get_supported_kind(2, self.config.network, EXACT) is None:
            failure = f"SellerConfig.exact: the facilitator does not list exact on {self.config.network} in /supported"
            log.error("seller start-up check failed: %s", failure)
            return failure
        return None

    async def _exact_requirements(self, route: PricedRoute, amount: int, pay_to: str) -> PaymentRequirements:
        server = await self._resource_server()
        price = AssetAmount(
            amount=str(amount), asset=self.token.address, extra={"name": self.token.name, "version": self.token.version}
        )
        config = ResourceConfig(
            scheme=EXACT,
            pay_to=pay_to,
            price=price,
            network=self.config.network,
            max_timeout_seconds=route.max_timeout_seconds,
        )
        return server.build_payment_requirements(config)[0]

    async def pay_exact(
        self,
        payload: PaymentPayload,
        accepts: list[PaymentRequirements],
        context: HTTPRequestContext,
        run_handler: Callable[[], Awaitable[StoredResponse]],
    ) -> ExactOutcome:
        """Verify, serve and settle an `exact` payment through the SDK, as its own middleware does:
        the handler runs after the facilitator's verify, and is settled only if it succeeded."""
        offered = [a for a in accepts if a.scheme == EXACT]
        server = await self._resource_server() if offered else None
        requirements = server.find_matching_requirements(offered, payload) if server is not None else None
        if server is None or requirements is None:
            reason = Reason.REQUIREMENTS_MISMATCH if offered else Reason.UNSUPPORTED_SCHEME
            return ExactOutcome(error=str(reason))
        transport = HTTPTransportContext(request=context)
        verified = await _facilitator_step(server.verify_payment(payload, requirements, transport_context=transport))
        if isinstance(verified, ExactOutcome):
            return verified
        if not verified.is_valid:
            return ExactOutcome(error=verified.invalid_reason or "invalid_payment")
        response = await run_handler()
        if response.status >= 400:  # not charged, as the SDK's middleware does
            return ExactOutcome(response=response)
        settled = await _facilitator_step(server.settle_payment(payload, requirements, transport_context=transport))
        if isinstance(settled, ExactOutcome) or not settled.success:
            error = None if isinstance(settled, ExactOutcome) else settled.error_reason or "settlement_failed"
            return settled if isinstance(settled, ExactOutcome) else ExactOutcome(error=error)
        return ExactOutcome(response=response, settle=settled)


async def _facilitator_step(step: Awaitable[_T]) -> _T | ExactOutcome:
    """One verify or settle through the SDK: a hook's abort is the buyer's 402, any other failure the
    facilitator's (503: nothing was charged; the same payment may be sent again)."""
    try:
        return await step
    except PaymentAbortedError as exc:
        return ExactOutcome(error=str(exc.reason))
    except Exception as exc:  # noqa: BLE001 - down, timed out, answered garbage: not the buyer's fault
        log.warning("the exact facilitator failed: %s", exc)
        return ExactOutcome(unavailable=True)


def verify_context(payload: PaymentPayload, requirements: PaymentRequirements, context: HTTPRequestContext) -> Any:
    return VerifyContext(payment_payload=payload, requirements=requirements, transport_context=_transport(context))


def verify_result_context(
    payload: PaymentPayload, requirements: PaymentRequirements, context: HTTPRequestContext, payer: str
) -> Any:
    return VerifyResultContext(
        payment_payload=payload,
        requirements=requirements,
        transport_context=_transport(context),
        result=VerifyResponse(is_valid=True, payer=payer),
    )


def settle_context(
    payload: PaymentPayload,
    requirements: PaymentRequirements,
    context: HTTPRequestContext,
    *,
    phase: SettlePhase = "before-handler",
) -> Any:
    return SettleContext(
        payment_payload=payload, requirements=requirements, transport_context=_transport(context), phase=phase
    )


def _transport(context: HTTPRequestContext) -> HTTPTransportContext:
    return HTTPTransportContext(request=context)


__all__ = ["EXACT", "ExactOffer", "ExactOutcome", "Offers", "ScopeAdapter", "SellerHooks", "request_context"]
