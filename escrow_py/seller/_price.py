"""Money prices: `"$0.01"` and the SDK's price objects resolved to a token's atomic units.

The x402 SDK takes `"$0.01"`, `0.01`, `"1.5 USDC"`, `AssetAmount(...)` or
`{"amount", "asset", "extra"}` and fills in the asset per network from its
default-asset table. This module does the same for delivery-escrow, with two
differences that matter for money:

- an amount the token cannot represent (`"$0.0000001"` on a 6-decimal token) is
  refused with ConfigError; the SDK silently truncates it, possibly to 0;
- a network the SDK's table does not know (a local anvil chain) takes the TestUSDC
  recorded beside the local escrow deployment (6 decimals, domain USDC/2).

    token = default_token("eip155:84532")                     # Base Sepolia USDC
    atomic_amount("$0.01", token, "eip155:84532")              # 10000
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, TypeAlias

from x402.http import HTTPRequestContext
from x402.mechanisms.evm.default_assets import find_default_asset, get_default_asset
from x402.schemas import AssetAmount
from x402.schemas.helpers import parse_money

from escrow_py.chain.registry import KnownToken, local_registry_dir, registry_path, resolve_escrow
from escrow_py.protocol.codec import setting_address
from escrow_py.protocol.errors import ConfigError

# What a route's `price` may be: the SDK's Price (money or an AssetAmount) or its dict form.
Price: TypeAlias = str | int | float | AssetAmount | Mapping[str, Any]
# Like the SDK's DynamicPrice / DynamicPayTo: called per request with its HTTPRequestContext.
DynamicPrice: TypeAlias = Callable[[HTTPRequestContext], "Price | Awaitable[Price]"]
DynamicPayTo: TypeAlias = Callable[[HTTPRequestContext], "str | Awaitable[str]"]

# The local TestUSDC (contracts/test/TestUSDC.sol): USDC's domain and decimals.
LOCAL_TOKEN_NAME, LOCAL_TOKEN_VERSION, LOCAL_TOKEN_DECIMALS = "USDC", "2", 6


def _sdk_entry(network: str, asset: str | None = None) -> dict[str, Any] | None:
    """The SDK's default-asset entry: the network's default, or the entry of `asset` (None: unknown)."""
    try:
        entry = find_default_asset(asset, network) if asset is not None else get_default_asset(network)
    except ValueError:  # "No default asset configured for network ..."
        return None
    return dict(entry) if entry is not None else None


def _known(entry: Mapping[str, Any]) -> KnownToken:
    asset = setting_address(entry["asset"], "the x402 SDK's default asset")
    return KnownToken(asset, entry["name"], entry["version"], int(entry["decimals"]))


def default_token(network: str) -> KnownToken:
    """The token a money price is paid in on `network`: the SDK's default asset, else the local TestUSDC.

    The local one is the `token` of the deployment record in `.x402-escrow/deployments/` (or
    $X402_ESCROW_DEPLOYMENTS_DIR), which `x402-escrow` writes when it deploys to a local chain.
    """
    entry = _sdk_entry(network)
    if entry is not None:
        return _known(entry)
    path = registry_path(network, local_registry_dir())
    if path.is_file():
        token = resolve_escrow(network, directory=path.parent).token
        if token is not None:
            address = setting_address(token, f"the token of deployment record {path}")
            return KnownToken(address, LOCAL_TOKEN_NAME, LOCAL_TOKEN_VERSION, LOCAL_TOKEN_DECIMALS)
    raise ConfigError(
        f"no default token for {network}: the x402 SDK has no default asset there and no local deployment "
        f"record {path} names a token; give the token's address"
    )


def token_for(network: str, address: str = "", name: str = "", version: str = "") -> KnownToken:
    """The token a seller is paid in on `network`, with its EIP-712 domain and decimals.

    No `address`: the network's default (`default_token`). A token the SDK's table knows takes
    its domain from there, and a `name`/`version` given must be that domain; any other token
    is taken as a TestUSDC-like one (6 decimals, domain `name`/`version`, by default USDC/2).
    """
    if not address:
        known = default_token(network)
    else:
        entry = _sdk_entry(network, address)
        if entry is None:
            return KnownToken(
                setting_address(address, f"token on {network}"),
                name or LOCAL_TOKEN_NAME,
                version or LOCAL_TOKEN_VERSION,
                LOCAL_TOKEN_DECIMALS,
            )
        known = _known(entry)
    if (name or known.name, version or known.version) != (known.name, known.version):
        raise ConfigError(
            f"token {known.address} on {network} signs in the EIP-712 domain {known.name!r}/{known.version!r} "
            f"(the x402 SDK's table), not {name or known.name!r}/{version or known.version!r}: every payment "
            "would fail at the token"
        )
    return known


def atomic_amount(price: object, token: KnownToken, network: str) -> int:
    """The price in `token`'s atomic units; ConfigError if it is not exactly a positive number of them.

    Money (`"$0.01"`, `"0.01"`, `0.01`, `"0.01 USDC"`) is in whole tokens; an AssetAmount or
    `{"amount", "asset", "extra"?}` is already atomic and must name `token` (and its domain, if it
    gives one).
    """
    if isinstance(price, AssetAmount):
        price = price.model_dump(exclude_none=True)
    if isinstance(price, Mapping):
        return _asset_amount(price, token, network)
    if isinstance(price, bool) or not isinstance(price, (str, int, float)):
        raise ConfigError(f"price {price!r} is neither money ('$0.01') nor an asset amount")
    try:
        money = parse_money(price)
    except ValueError:
        raise ConfigError(f"price {price!r} is not money: write '$0.01', '0.01' or '0.01 USDC'") from None
    symbol = money.get("symbol")
    entry = _sdk_entry(network, token.address)
    if symbol is not None and symbol != (entry["symbol"] if entry else "USDC"):
        raise ConfigError(f"price {price!r} is in {symbol}, but the route is paid in token {token.address}")
    scaled = Decimal(money["amount"]).scaleb(token.decimals)
    if scaled != scaled.to_integral_value() or scaled <= 0:
        raise ConfigError(
            f"price {price!r} is {scaled.normalize()} atomic units of a {token.decimals}-decimal token: "
            "not a positive whole number of units"
        )
    return int(scaled)


def _asset_amount(price: Mapping[str, Any], token: KnownToken, network: str) -> int:
    asset, raw = price.get("asset"), price.get("amount")
    if setting_address(asset, "price asset") != token.address:
        raise ConfigError(f"price names asset {asset!r}, but the route is paid in token {token.address} on {network}")
    try:
        amount = Decimal(str(raw))
    except InvalidOperation:
        amount = Decimal(0)
    if isinstance(raw, bool) or amount != amount.to_integral_value() or amount <= 0:
        raise ConfigError(f"price amount {raw!r} is not a positive whole number of atomic units")
    extra = price.get("extra") or {}
    for key, expected in (("name", token.name), ("version", token.version)):
        if key in extra and extra[key] != expected:
            raise ConfigError(f"price extra.{key} is {extra[key]!r}, but token {token.address} uses {expected!r}")
    return int(amount)


__all__ = ["DynamicPayTo", "DynamicPrice", "Price", "atomic_amount", "default_token", "token_for"]
