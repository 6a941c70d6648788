"""Keeper settings, from flags, environment variables and an optional TOML file, validated up front.

Precedence: a flag beats an environment variable beats the TOML file beats the default.

    X402_ESCROW_RPC_URL          rpc_url
    X402_ESCROW_ESCROWS          escrows (comma-separated addresses)
    X402_KEEPER_NETWORK          network (CAIP-2, default eip155:84532): checked against the RPC's chain id
    X402_KEEPER_TOKENS           tokens refunded besides the registry's (comma-separated; "*": any token)
    X402_KEEPER_START_BLOCK      start_block
    X402_KEEPER_CONFIRMATIONS    confirmations
    X402_KEEPER_BATCH_SIZE       batch_size (at most MAX_BATCH_SIZE)
    X402_KEEPER_MAX_BATCH_GAS    max_batch_gas
    X402_KEEPER_POLL_INTERVAL    poll_interval (seconds)
    X402_KEEPER_STANDBY_AFTER    standby_after (seconds past a deadline before this keeper steps in)
    X402_KEEPER_DATABASE         database (SQLite path, sqlite:/// URL or postgresql:// URL)
    X402_KEEPER_KEYSTORE         keystore (passphrase in X402_ESCROW_KEYSTORE_PASSPHRASE)
    X402_ESCROW_PRIVATE_KEY      the key, when no keystore is given
    X402_KEEPER_BUYERS / _SELLERS  only refund escrows of these buyers / sellers
    X402_KEEPER_METRICS          metrics address host:port (empty: none)
    X402_KEEPER_REORG_DEPTH      reorg_depth: blocks after which an event or a sent transaction is final
    X402_KEEPER_REPLACE_AFTER    replace_after (seconds before a pending refund is re-sent with higher fees)
    X402_KEEPER_RETRY_AFTER      retry_after (seconds before a refund the token refused is tried again; doubled
                                 per refusal in a row, up to LONGEST_RETRY)
    X402_KEEPER_RPC_TIMEOUT      rpc_timeout (seconds for one JSON-RPC call, whatever the node does)
    X402_KEEPER_RETENTION        retention (seconds past a deadline settled rows are kept; hourly prune; 0: forever)
    X402_KEEPER_LOG_JSON         log_json

Every value is checked for its type here, and an error names the setting and the
value found (`poll_interval = 'fast': expected a number of seconds`).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from eth_typing import ChecksumAddress

from escrow_py.chain.registry import USDC, registry_path
from escrow_py.protocol.codec import chain_id_of, setting_address
from escrow_py.protocol.errors import ConfigError, ProtocolError
from escrow_py.storage import describe, is_postgres_url

MAX_LOG_CHUNK = 2_000

# Nodes refuse a transaction over 128 KiB (geth's txMaxSize); a refundMany entry is 256 bytes of
# calldata. Keeping the calldata under 120,000 bytes leaves room for the signature and envelope.
MAX_CALLDATA_BYTES = 120_000
TERMS_BYTES = 256
MAX_BATCH_SIZE = (MAX_CALLDATA_BYTES - 4 - 64) // TERMS_BYTES  # selector, array offset and length

# A buyer whose refunds the token keeps refusing (a blacklist) is tried again at least this often.
LONGEST_RETRY = 6 * 3600.0
MIN_RETENTION = 3600  # a pruned settlement cannot be undone by a reorg: keep rows well past any reorg's reach

DEFAULT_NETWORK = "eip155:84532"
ANY_TOKEN = "*"  # noqa: S105 - the wildcard of the token allowlist, not a secret

_ENV = {
    "rpc_url": "X402_ESCROW_RPC_URL",
    "escrows": "X402_ESCROW_ESCROWS",
    "network": "X402_KEEPER_NETWORK",
    "tokens": "X402_KEEPER_TOKENS",
    "start_block": "X402_KEEPER_START_BLOCK",
    "confirmations": "X402_KEEPER_CONFIRMATIONS",
    "batch_size": "X402_KEEPER_BATCH_SIZE",
    "max_batch_gas": "X402_KEEPER_MAX_BATCH_GAS",
    "poll_interval": "X402_KEEPER_POLL_INTERVAL",
    "standby_after": "X402_KEEPER_STANDBY_AFTER",
    "database": "X402_KEEPER_DATABASE",
    "keystore": "X402_KEEPER_KEYSTORE",
    "buyers": "X402_KEEPER_BUYERS",
    "sellers": "X402_KEEPER_SELLERS",
    "metrics": "X402_KEEPER_METRICS",
    "reorg_depth": "X402_KEEPER_REORG_DEPTH",
    "replace_after": "X402_KEEPER_REPLACE_AFTER",
    "retry_after": "X402_KEEPER_RETRY_AFTER",
    "retention": "X402_KEEPER_RETENTION",
    "rpc_timeout": "X402_KEEPER_RPC_TIMEOUT",
    "log_json": "X402_KEEPER_LOG_JSON",
}

T = TypeVar("T")


def _setting(name: str, value: Any, expected: str, convert: Callable[[Any], T]) -> T:
    """`convert(value)`, or a ConfigError naming the setting, the value found and what was expected."""
    if isinstance(value, bool):  # TOML `true` is not a number, and int(True) would pass silently
        raise ConfigError(f"{name} = {json.dumps(value)}: expected {expected}")
    try:
        return convert(value)
    except (TypeError, ValueError, OverflowError):
        shown = json.dumps(value) if isinstance(value, str | int | float | list) else repr(value)
        raise ConfigError(f"{name} = {shown}: expected {expected}") from None


def _int(name: str, value: Any, low: int, high: int | None = None) -> int:
    def convert(v: Any) -> int:
        if isinstance(v, float) and not v.is_integer():
            raise ValueError(v)
        number = int(v) if isinstance(v, int | float) else int(str(v).strip(), 10)
        if number < low or (high is not None and number > high):
            raise ValueError(v)
        return number

    bound = f"an integer from {low} to {high}" if high is not None else f"an integer of at least {low}"
    return _setting(name, value, bound, convert)


def _seconds(name: str, value: Any, *, allow_zero: bool) -> float:
    def convert(v: Any) -> float:
        number = float(v) if isinstance(v, int | float) else float(str(v).strip())
        if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
            raise ValueError(v)
        return number

    return _setting(name, value, "a number of seconds" + (" (0 or more)" if allow_zero else " above 0"), convert)


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} = {json.dumps(value)}: expected true or false")


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} = {json.dumps(value)}: expected a string")
    return value


def _list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ConfigError(f"{name} = {json.dumps(value, default=str)}: expected a list of addresses or a "
                      "comma-separated string")  # fmt: skip


def _addresses(name: str, value: Any) -> tuple[ChecksumAddress, ...]:
    return tuple(setting_address(item, name) for item in _list(name, value))


@dataclass(frozen=True)
class KeeperConfig:
    """Everything the keeper needs; construct it with `KeeperConfig.load(...)` to get validation."""

    rpc_url: str
    escrows: tuple[ChecksumAddress, ...]
    network: str = DEFAULT_NETWORK
    tokens: tuple[ChecksumAddress, ...] = ()  # refunded besides the registry's tokens for `network`
    any_token: bool = False  # tokens = "*": refund escrows of every token (bisection still guards the batches)
    start_block: int = 0
    confirmations: int = 1
    batch_size: int = 100
    max_batch_gas: int = 20_000_000
    poll_interval: float = 2.0
    standby_after: float = 0.0  # a standby keeper waits this long past a deadline for the active one
    database: str = "keeper.sqlite"
    keystore: str | None = None
    buyers: tuple[ChecksumAddress, ...] = ()
    sellers: tuple[ChecksumAddress, ...] = ()
    metrics: str | None = None
    reorg_depth: int = 12  # blocks after which an indexed event or a keeper transaction is final
    replace_after: float = 30.0  # seconds before a pending refund is re-sent with higher fees
    retry_after: float = 300.0  # first wait after a refused payout or a failed simulation (doubles, to LONGEST_RETRY)
    rpc_timeout: float = 10.0
    retention: float = 0.0  # seconds past its deadline a settled escrow's rows are kept (0: kept forever)
    log_json: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rpc_url.startswith(("http://", "https://")):
            raise ConfigError(f"rpc_url = {self.rpc_url!r}: expected an http(s) URL")
        if not self.escrows:
            raise ConfigError("no escrow address: pass --escrow ADDRESS (repeatable) or set X402_ESCROW_ESCROWS")
        try:
            chain_id_of(self.network)
        except (ProtocolError, AttributeError):
            raise ConfigError(f"network = {self.network!r}: expected a CAIP-2 id such as eip155:84532") from None
        for name, value, low, high in (
            ("start_block", self.start_block, 0, None),
            ("confirmations", self.confirmations, 1, None),
            ("batch_size", self.batch_size, 1, MAX_BATCH_SIZE),
            ("max_batch_gas", self.max_batch_gas, 100_000, None),
            ("reorg_depth", self.reorg_depth, 0, None),
        ):
            _int(name, value, low, high)
        if "://" in self.database and not self.database.startswith("sqlite:///") and not is_postgres_url(self.database):
            raise ConfigError(
                f"database {describe(self.database)!r}: expected a SQLite path, sqlite:///path or postgresql://..."
            )
        _seconds("poll_interval", self.poll_interval, allow_zero=False)
        _seconds("rpc_timeout", self.rpc_timeout, allow_zero=False)
        _seconds("standby_after", self.standby_after, allow_zero=True)
        _seconds("replace_after", self.replace_after, allow_zero=True)
        _seconds("retry_after", self.retry_after, allow_zero=False)
        if _seconds("retention", self.retention, allow_zero=True) and self.retention < MIN_RETENTION:
            raise ConfigError(
                f"retention = {self.retention:g}: expected 0 (keep everything) or at least {MIN_RETENTION} seconds, "
                "well past the reorg depth"
            )
        if self.metrics is not None:
            host, _, port = self.metrics.rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ConfigError(f"metrics = {self.metrics!r}: expected host:port")

    @property
    def chain_id(self) -> int:
        return chain_id_of(self.network)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if self.metrics is None:
            return None
        host, _, port = self.metrics.rpartition(":")
        return host, int(port)

    def allowed_tokens(self) -> frozenset[str] | None:
        """Lower-case addresses of the tokens whose escrows this keeper refunds; None: every token.

        By default the tokens the shipped deployment registry knows for `network` (its USDC, and the
        test token of a local deployment) plus `tokens`. Anyone can escrow any token, and a token can
        make a refund revert only when mined; an allowlist keeps such tokens out of the batches.
        """
        if self.any_token:
            return None
        allowed = {t.lower() for t in self.tokens}
        if self.network in USDC:
            allowed.add(USDC[self.network].address.lower())
        registered = registry_entry(self.network).get("token")
        if registered is not None:  # a deployment record naming a malformed token is refused, not skipped
            allowed.add(setting_address(registered, f"the token of the {self.network} deployment record").lower())
        return frozenset(allowed)

    @classmethod
    def load(
        cls, flags: Mapping[str, Any], *, config_file: str | None = None, environ: Mapping[str, str] | None = None
    ) -> KeeperConfig:
        """Merge flags (None means unset), environment and TOML file, then validate."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if config_file:
            path = Path(config_file).expanduser()
            try:
                data = tomllib.loads(path.read_text())
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
            section = data.get("keeper", data)
            if not isinstance(section, dict):
                raise ConfigError(f"config file {path}: [keeper] must be a table")
            unknown = set(section) - set(_ENV)
            if unknown:
                raise ConfigError(f"config file {path}: unknown settings {sorted(unknown)}; known: {sorted(_ENV)}")
            values.update(section)
        for name, var in _ENV.items():
            if env.get(var):
                values[name] = env[var]
        values.update({k: v for k, v in flags.items() if v is not None and k in _ENV})
        if "rpc_url" not in values:
            raise ConfigError("no RPC URL: pass --rpc URL or set X402_ESCROW_RPC_URL")
        tokens = _list("tokens", values.get("tokens", ""))
        any_token = ANY_TOKEN in tokens
        keystore = values.get("keystore")
        metrics = values.get("metrics")
        return cls(
            rpc_url=_text("rpc_url", values["rpc_url"]),
            escrows=_addresses("escrows", values.get("escrows", "")),
            network=_text("network", values.get("network", DEFAULT_NETWORK)),
            tokens=_addresses("tokens", [t for t in tokens if t != ANY_TOKEN]),
            any_token=any_token,
            start_block=_int("start_block", values.get("start_block", 0), 0),
            confirmations=_int("confirmations", values.get("confirmations", 1), 1),
            batch_size=_int("batch_size", values.get("batch_size", 100), 1, MAX_BATCH_SIZE),
            max_batch_gas=_int("max_batch_gas", values.get("max_batch_gas", 20_000_000), 100_000),
            poll_interval=_seconds("poll_interval", values.get("poll_interval", 2.0), allow_zero=False),
            standby_after=_seconds("standby_after", values.get("standby_after", 0.0), allow_zero=True),
            database=_text("database", values.get("database", "keeper.sqlite")),
            keystore=_text("keystore", keystore) or None if keystore is not None else None,
            buyers=_addresses("buyers", values.get("buyers", "")),
            sellers=_addresses("sellers", values.get("sellers", "")),
            metrics=_text("metrics", metrics) or None if metrics is not None else None,
            reorg_depth=_int("reorg_depth", values.get("reorg_depth", 12), 0),
            replace_after=_seconds("replace_after", values.get("replace_after", 30.0), allow_zero=True),
            retry_after=_seconds("retry_after", values.get("retry_after", 300.0), allow_zero=False),
            rpc_timeout=_seconds("rpc_timeout", values.get("rpc_timeout", 10.0), allow_zero=False),
            retention=_seconds("retention", values.get("retention", 0.0), allow_zero=True),
            log_json=_bool("log_json", values.get("log_json", False)),
        )


def registry_entry(network: str) -> dict[str, Any]:
    """The shipped deployment registry's record for `network` (escrow, token, ...); empty if there is none."""
    try:
        path = registry_path(network)
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (ConfigError, OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
