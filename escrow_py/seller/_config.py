"""Seller settings: priced routes and everything the middleware needs, validated when built."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_typing import ChecksumAddress

from escrow_py.chain.signer import Signer
from escrow_py.protocol.codec import setting_address
from escrow_py.protocol.errors import ConfigError, ProtocolError
from escrow_py.protocol.terms import MAX_DEADLINE_WINDOW
from escrow_py.protocol.wire import SettlementMode, chain_id_of
from escrow_py.seller._offers import ExactOffer, SellerHooks, check_route_prices, resolve_route_prices
from escrow_py.seller._price import DynamicPayTo, DynamicPrice, Price, token_for
from escrow_py.storage import describe, is_postgres_url

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def _compile_path(pattern: str) -> re.Pattern[str]:
    """`/report/{item}` matches one segment; `{rest:path}` matches the rest of the path."""
    parts: list[str] = []
    last = 0
    for match in _PARAM.finditer(pattern):
        parts.append(re.escape(pattern[last : match.start()]))
        parts.append(".+" if match.group(2) else "[^/]+")
        last = match.end()
    parts.append(re.escape(pattern[last:]))
    return re.compile("^" + "".join(parts) + "$")


@dataclass(frozen=True, slots=True)
class PricedRoute:
    """One paid endpoint: requests with this method whose path matches `path` cost `amount` atomic units.

    `settlement` is "hold" (deposit before the handler runs) or "serve-first" (serve after the
    off-chain checks and an eth_call of the pull, settle later in a batch; DESIGN.md section 8).
    A serve-first request past an exposure limit (SellerConfig.serve_first_*), or from a buyer
    who left a settlement unpaid, is served in hold mode when `fallback_to_hold` (the default),
    else refused with a 402 whose reason says why (`serve_first_limit`, `serve_first_refused`).
    In the x402 SDK's terms instead of `amount`: `price` is money (`"$0.01"`), an asset amount
    (`{"amount", "asset", "extra"}`), or a callable of the request's `HTTPRequestContext`
    returning one (resolved per request); `pay_to` a seller address or such a callable (default:
    SellerConfig.pay_to). `schemes` orders the offers of the 402 (`("exact", "delivery-escrow")`
    puts the SDK's exact first; `("delivery-escrow",)` makes exact unavailable here; default:
    SellerConfig.exact's order). `discovery` is the SDK's bazaar declaration
    (`declare_discovery_extension(...)`) for this route.
    """

    method: str
    path: str
    amount: int = 0
    max_timeout_seconds: int = 120
    description: str = ""
    mime_type: str | None = None
    settlement: SettlementMode | str = SettlementMode.HOLD
    fallback_to_hold: bool = True
    price: Price | DynamicPrice | None = None
    pay_to: str | DynamicPayTo | None = None
    schemes: tuple[str, ...] | None = None
    discovery: Mapping[str, Any] | None = None
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        method = self.method.upper() if isinstance(self.method, str) else self.method
        if method not in _METHODS:
            raise ConfigError(f"PricedRoute.method must be one of {sorted(_METHODS)}, got {self.method!r}")
        object.__setattr__(self, "method", method)
        if not isinstance(self.path, str) or not self.path.startswith("/"):
            raise ConfigError(f"PricedRoute.path must start with '/', got {self.path!r}")
        check_route_prices(self)
        timeout = self.max_timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= MAX_DEADLINE_WINDOW:
            raise ConfigError(f"PricedRoute.max_timeout_seconds must be in [1, {MAX_DEADLINE_WINDOW}], got {timeout!r}")
        try:
            object.__setattr__(self, "settlement", SettlementMode(self.settlement))
        except ValueError:
            modes = [m.value for m in SettlementMode]
            raise ConfigError(f"PricedRoute.settlement must be one of {modes}, got {self.settlement!r}") from None
        if not isinstance(self.fallback_to_hold, bool):
            raise ConfigError(f"PricedRoute.fallback_to_hold must be True or False, got {self.fallback_to_hold!r}")
        object.__setattr__(self, "_regex", _compile_path(self.path))

    @property
    def serve_first(self) -> bool:
        return self.settlement is SettlementMode.SERVE_FIRST

    def matches(self, method: str, path: str) -> bool:
        return method.upper() == self.method and self.matches_path(path)

    def matches_path(self, path: str) -> bool:
        return self._regex.match(path) is not None


def _checked_address(value: object, name: str) -> ChecksumAddress:
    return setting_address(value, f"SellerConfig.{name}")


@dataclass(frozen=True, slots=True)
class SellerConfig:
    """Everything the seller middleware needs; raises ConfigError naming the setting at fault.

    `operator` sends the deposit, delivery and refund transactions; it is the terms'
    operator. `min_time_left` is the least time a payment's deadline must leave to be
    accepted (and to be served after a crash); `deadline_slack` tolerates a buyer
    whose clock runs a little ahead of the chain's.

    Time limits on the request path: every chain call ends within `rpc_timeout` seconds
    (retries included), or the request gets 503 `chain_unavailable`; a deposit not
    confirmed within `tx_timeout` seconds gets 503 `deposit_pending` (the same payment
    sent again later is served once it lands); a transaction not mined after
    `reprice_after` seconds is sent again with higher fees. Every transaction is
    followed until `confirmation_depth` blocks deep, and a delivery a reorg drops
    before that is sent again. `startup_checks` checks the chain, escrow, token and
    operator when the app starts (see `check_seller`).

    Serve-first exposure (required as soon as one route is serve-first, in atomic units): a
    serve-first route may cost at most `serve_first_max_price`; one buyer may owe at most
    `serve_first_max_per_buyer` in settlements not yet paid, all buyers together at most
    `serve_first_max_total`. Past a limit a request falls back to hold (or gets 402, see
    PricedRoute). Unpaid means served or being served and not yet settled on chain.
    `settle_batch_wait` (seconds, below `min_time_left`) lets the poster hold queued settlements
    back until the oldest has waited that long (or a batch is full), so one settleMany pays more
    of them (cheaper per item); 0 sends whatever is queued at every pass.

    Several processes or replicas on one store: a payment is claimed in the store for
    `claim_seconds` (renewed while it is handled; a dead holder's claim lapses after it),
    and a copy of it arriving meanwhile waits up to `claim_wait` seconds for the answer
    before 503 payment_in_progress. One poster per operator key holds a lease of
    `poster_lease` seconds; another replica's poster takes over once it lapses.

    In the x402 ecosystem: `exact=ExactOffer(facilitator)` also offers the SDK's `exact` scheme
    in the same 402, settled through that facilitator as the SDK does; `hooks=SellerHooks()`
    runs the seller's own checks and bookkeeping around verify and settle (both in _offers.py).
    """

    rpc_url: str
    escrow: str
    # "": the network's default (the SDK's table: USDC on Base and Base Sepolia; the local
    # deployment's TestUSDC on a local chain). Keyword-only, so it may have that default.
    token: str = field(default="", kw_only=True)
    network: str
    pay_to: str
    operator: Signer
    routes: list[PricedRoute] | tuple[PricedRoute, ...]
    store: str | Path = "seller.sqlite"  # or postgresql://user@host/db: replicas share one store
    confirmations: int = 1
    min_time_left: int = 10
    # The token's EIP-712 domain; "": the SDK table's for a token it knows, else USDC/2 (TestUSDC's).
    token_name: str = ""
    token_version: str = ""
    public_base_url: str | None = None
    poster_interval: float = 0.5
    deadline_slack: int = 30
    max_body_bytes: int = 1024 * 1024
    rpc_timeout: float = 5.0
    tx_timeout: float = 30.0
    reprice_after: float = 10.0
    confirmation_depth: int = 5
    startup_checks: bool = True
    serve_first_max_price: int | None = None
    serve_first_max_per_buyer: int | None = None
    serve_first_max_total: int | None = None
    settle_batch_wait: float = 0.0
    claim_seconds: float = 10.0
    claim_wait: float = 10.0
    poster_lease: float = 5.0
    exact: ExactOffer | None = None
    hooks: SellerHooks | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.rpc_url, str) or not self.rpc_url.startswith(("http://", "https://")):
            raise ConfigError(f"SellerConfig.rpc_url must be an http(s) URL, got {self.rpc_url!r}")
        object.__setattr__(self, "escrow", _checked_address(self.escrow, "escrow"))
        object.__setattr__(self, "pay_to", _checked_address(self.pay_to, "pay_to"))
        try:
            chain_id_of(self.network)
        except ProtocolError:
            raise ConfigError(f"SellerConfig.network must be a CAIP-2 eip155 id, got {self.network!r}") from None
        if self.token:
            object.__setattr__(self, "token", _checked_address(self.token, "token"))
        token = token_for(self.network, self.token, self.token_name, self.token_version)
        object.__setattr__(self, "token", token.address)
        object.__setattr__(self, "token_name", token.name)
        object.__setattr__(self, "token_version", token.version)
        if not isinstance(self.operator, Signer):
            raise ConfigError("SellerConfig.operator must be a Signer (escrow_py.chain.signer)")
        routes = tuple(self.routes)
        if not routes or not all(isinstance(r, PricedRoute) for r in routes):
            raise ConfigError("SellerConfig.routes must be a non-empty list of PricedRoute")
        object.__setattr__(self, "routes", resolve_route_prices(self, routes))
        self._check_numbers(routes)
        self._check_exposure(routes)

    def _check_exposure(self, routes: tuple[PricedRoute, ...]) -> None:
        """Serve-first needs its three limits, coherent with each other and with every serve-first price."""
        wait = self.settle_batch_wait
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait < self.min_time_left:
            raise ConfigError(
                f"SellerConfig.settle_batch_wait must be seconds >= 0 and below min_time_left {self.min_time_left} "
                f"(a serve-first payment may have that little time left), got {wait!r}"
            )
        names = ("serve_first_max_price", "serve_first_max_per_buyer", "serve_first_max_total")
        for name in names:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"SellerConfig.{name} must be a positive integer (atomic units), got {value!r}")
        serve_first = [r for r in routes if r.serve_first]
        if not serve_first:
            return
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            shown = ", ".join(f"{r.method} {r.path}" for r in serve_first)
            raise ConfigError(f"serve-first routes ({shown}) need the exposure limits {', '.join(missing)}")
        price, per_buyer, total = (int(getattr(self, n)) for n in names)
        if per_buyer > total:
            raise ConfigError(
                f"SellerConfig.serve_first_max_per_buyer {per_buyer} exceeds serve_first_max_total {total}"
            )
        if price > per_buyer:
            raise ConfigError(
                f"SellerConfig.serve_first_max_price {price} exceeds serve_first_max_per_buyer {per_buyer}: "
                "no serve-first request at that price could ever be served"
            )
        for route in serve_first:
            if route.price is not None:
                raise ConfigError(
                    f"route {route.method} {route.path} is serve-first: it needs a fixed amount in atomic units "
                    "(not a price), so its exposure is checked when the config is built"
                )
            if route.amount > price:
                raise ConfigError(
                    f"route {route.method} {route.path} is serve-first at {route.amount}, more than "
                    f"serve_first_max_price {price}"
                )

    def _check_numbers(self, routes: tuple[PricedRoute, ...]) -> None:
        integers = (
            ("confirmations", 1),
            ("min_time_left", 0),
            ("deadline_slack", 0),
            ("max_body_bytes", 0),
            ("confirmation_depth", 1),
        )
        for name, minimum in integers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"SellerConfig.{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("poster_interval", "rpc_timeout", "tx_timeout", "reprice_after", "claim_seconds", "claim_wait",
                     "poster_lease"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"SellerConfig.{name} must be a number of seconds > 0, got {value!r}")
        if not isinstance(self.startup_checks, bool):
            raise ConfigError(f"SellerConfig.startup_checks must be True or False, got {self.startup_checks!r}")
        for route in routes:
            if route.max_timeout_seconds <= self.min_time_left:
                raise ConfigError(
                    f"route {route.method} {route.path}: max_timeout_seconds {route.max_timeout_seconds} "
                    f"must exceed min_time_left {self.min_time_left}"
                )
        if self.public_base_url is not None:
            if not self.public_base_url.startswith(("http://", "https://")):
                raise ConfigError(f"SellerConfig.public_base_url must be an http(s) URL, got {self.public_base_url!r}")
            object.__setattr__(self, "public_base_url", self.public_base_url.rstrip("/"))
        if not isinstance(self.store, (str, Path)) or not str(self.store):
            raise ConfigError("SellerConfig.store must be a SQLite path, a sqlite:/// URL or a postgresql:// URL")
        store = self.store
        if isinstance(store, str) and "://" in store and not (is_postgres_url(store) or store.startswith("sqlite:///")):
            raise ConfigError(
                "SellerConfig.store must be a SQLite path, a sqlite:/// URL or a postgresql:// URL, "
                f"got {describe(self.store)!r}"
            )

    @property
    def chain_id(self) -> int:
        return chain_id_of(self.network)

    def route_for(self, method: str, path: str) -> PricedRoute | None:
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None
