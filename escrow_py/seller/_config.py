"""Seller settings: priced routes and everything the middleware needs, validated when built."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_typing import ChecksumAddress
from eth_utils.address import is_address, to_checksum_address

from escrow_py.chain.signer import Signer
from escrow_py.errors import ConfigError, ProtocolError
from escrow_py.seller._offers import ExactOffer, SellerHooks, check_route_prices, resolve_route_prices
from escrow_py.seller._price import DynamicPayTo, DynamicPrice, Price, token_for
from escrow_py.terms import MAX_DEADLINE_WINDOW
from escrow_py.wire import chain_id_of

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
        object.__setattr__(self, "_regex", _compile_path(self.path))

    def matches(self, method: str, path: str) -> bool:
        return method.upper() == self.method and self.matches_path(path)

    def matches_path(self, path: str) -> bool:
        return self._regex.match(path) is not None


def _checked_address(value: object, name: str) -> ChecksumAddress:
    if not isinstance(value, str) or not is_address(value):
        raise ConfigError(f"SellerConfig.{name} must be a 0x address, got {value!r}")
    return to_checksum_address(value)


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
    store: str | Path = "seller.sqlite"
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
        for name in ("poster_interval", "rpc_timeout", "tx_timeout", "reprice_after"):
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
            raise ConfigError("SellerConfig.store must be a SQLite path or sqlite:/// URL")
        if isinstance(self.store, str) and "://" in self.store and not self.store.startswith("sqlite:///"):
            raise ConfigError(f"SellerConfig.store must be a SQLite path or sqlite:/// URL, got {self.store!r}")

    @property
    def chain_id(self) -> int:
        return chain_id_of(self.network)

    def route_for(self, method: str, path: str) -> PricedRoute | None:
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None
