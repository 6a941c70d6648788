"""Keeper settings, from flags, environment variables and an optional TOML file, validated up front.

Precedence: a flag beats an environment variable beats the TOML file beats the default.

    X402_ESCROW_RPC_URL          rpc_url
    X402_ESCROW_ESCROWS          escrows (comma-separated addresses)
    X402_KEEPER_START_BLOCK      start_block
    X402_KEEPER_CONFIRMATIONS    confirmations
    X402_KEEPER_BATCH_SIZE       batch_size
    X402_KEEPER_POLL_INTERVAL    poll_interval (seconds)
    X402_KEEPER_DATABASE         database (SQLite path or sqlite:/// URL)
    X402_KEEPER_KEYSTORE         keystore (passphrase in X402_ESCROW_KEYSTORE_PASSPHRASE)
    X402_ESCROW_PRIVATE_KEY      the key, when no keystore is given
    X402_KEEPER_BUYERS / _SELLERS  only refund escrows of these buyers / sellers
    X402_KEEPER_METRICS          metrics address host:port (empty: none)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_typing import ChecksumAddress
from eth_utils.address import is_address, to_checksum_address

from escrow_py.errors import ConfigError

MAX_LOG_CHUNK = 2_000

_ENV = {
    "rpc_url": "X402_ESCROW_RPC_URL",
    "escrows": "X402_ESCROW_ESCROWS",
    "start_block": "X402_KEEPER_START_BLOCK",
    "confirmations": "X402_KEEPER_CONFIRMATIONS",
    "batch_size": "X402_KEEPER_BATCH_SIZE",
    "poll_interval": "X402_KEEPER_POLL_INTERVAL",
    "database": "X402_KEEPER_DATABASE",
    "keystore": "X402_KEEPER_KEYSTORE",
    "buyers": "X402_KEEPER_BUYERS",
    "sellers": "X402_KEEPER_SELLERS",
    "metrics": "X402_KEEPER_METRICS",
    "reorg_depth": "X402_KEEPER_REORG_DEPTH",
    "replace_after": "X402_KEEPER_REPLACE_AFTER",
    "log_json": "X402_KEEPER_LOG_JSON",
}


def _addresses(value: Any, name: str) -> tuple[ChecksumAddress, ...]:
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value or [])
    out = []
    for item in items:
        if not item:
            continue
        if not isinstance(item, str) or not is_address(item):
            raise ConfigError(f"{name}: {item!r} is not an address (expected 0x followed by 40 hex digits)")
        out.append(to_checksum_address(item))
    return tuple(out)


@dataclass(frozen=True)
class KeeperConfig:
    """Everything the keeper needs; construct it with `KeeperConfig.load(...)` to get validation."""

    rpc_url: str
    escrows: tuple[ChecksumAddress, ...]
    start_block: int = 0
    confirmations: int = 1
    batch_size: int = 100
    poll_interval: float = 2.0
    database: str = "keeper.sqlite"
    keystore: str | None = None
    buyers: tuple[ChecksumAddress, ...] = ()
    sellers: tuple[ChecksumAddress, ...] = ()
    metrics: str | None = None
    reorg_depth: int = 12  # blocks re-scanned on every poll
    replace_after: float = 30.0  # seconds before a pending refund is re-sent with higher fees
    log_json: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.rpc_url.startswith(("http://", "https://")):
            raise ConfigError(f"rpc_url must be an http(s) URL, got {self.rpc_url!r}")
        if not self.escrows:
            raise ConfigError("no escrow address: pass --escrow ADDRESS (repeatable) or set X402_ESCROW_ESCROWS")
        for name, value, low in (
            ("start_block", self.start_block, 0),
            ("confirmations", self.confirmations, 1),
            ("batch_size", self.batch_size, 1),
            ("reorg_depth", self.reorg_depth, 0),
        ):
            if value < low:
                raise ConfigError(f"{name} must be at least {low}, got {value}")
        if "://" in self.database and not self.database.startswith("sqlite:///"):
            raise ConfigError(f"database {self.database!r}: only SQLite is supported so far (a path or sqlite:///path)")
        if self.poll_interval <= 0:
            raise ConfigError(f"poll_interval must be positive, got {self.poll_interval}")
        if self.metrics is not None:
            host, _, port = self.metrics.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"metrics must be host:port, got {self.metrics!r}")

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if self.metrics is None:
            return None
        host, _, port = self.metrics.rpartition(":")
        return host, int(port)

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
        try:
            return cls(
                rpc_url=str(values["rpc_url"]),
                escrows=_addresses(values.get("escrows", ""), "escrows"),
                start_block=int(values.get("start_block", 0)),
                confirmations=int(values.get("confirmations", 1)),
                batch_size=int(values.get("batch_size", 100)),
                poll_interval=float(values.get("poll_interval", 2.0)),
                database=str(values.get("database", "keeper.sqlite")),
                keystore=values.get("keystore") or None,
                buyers=_addresses(values.get("buyers", ""), "buyers"),
                sellers=_addresses(values.get("sellers", ""), "sellers"),
                metrics=values.get("metrics") or None,
                reorg_depth=int(values.get("reorg_depth", 12)),
                replace_after=float(values.get("replace_after", 30.0)),
                log_json=str(values.get("log_json", "")).lower() in ("1", "true", "yes"),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid keeper setting: {exc}") from None
