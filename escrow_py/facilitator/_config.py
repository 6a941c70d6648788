"""Facilitator settings, validated when built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from escrow_py.chain.signer import Signer
from escrow_py.protocol.codec import setting_address
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.wire import chain_id_of
from escrow_py.seller._config import PricedRoute, SellerConfig

# The most a request body may hold: a settle request is a few KB, a delivery batch 100 entries.
MAX_BODY_BYTES = 64 * 1024
MAX_DELIVERY_BATCH = 100
# Idempotency records are kept at least this long (a seller retries a hand-over for minutes, not hours).
MIN_RETENTION = 3600
DEFAULT_RETENTION = 7 * 86_400


@dataclass(frozen=True, slots=True)
class FacilitatorConfig:
    """One chain, one escrow, one token, one operator key; the database holds everything else.

    `rate` and `burst` bound each API key: `burst` requests at once, refilled at `rate` per
    second, counted in the database, so across every replica on it (give them all the same).
    The chain settings mean what they mean for the seller (SellerConfig): the facilitator
    sends the same transactions the seller would;
    `settle_batch_wait` lets the poster hold queued serve-first settlements back until the
    oldest has waited that long, so settlements handed over one /settle at a time still
    leave in one settleMany. `idempotency_retention` (seconds, 0: forever) is how long an
    idempotency record is kept: a replay within it gets the recorded answer; the facilitator
    deletes older ones hourly (as `x402-escrow prune --role facilitator --grace` does).
    `explorer_url` (e.g. a local Blockscout) is where the console links transactions; without
    it, Base Sepolia and Base link to Basescan and any other chain, or a development node
    such as anvil under a public id, shows the hashes unlinked (console.explorer_for).
    """

    rpc_url: str
    escrow: str
    token: str
    network: str
    operator: Signer
    store: str | Path = "facilitator.sqlite"
    token_name: str = "USDC"  # noqa: S105 - the token's EIP-712 name, not a secret
    token_version: str = "2"  # noqa: S105 - EIP-712 version
    min_time_left: int = 10
    deadline_slack: int = 30
    confirmations: int = 1
    rpc_timeout: float = 5.0
    tx_timeout: float = 30.0
    reprice_after: float = 10.0
    confirmation_depth: int = 5
    poster_interval: float = 0.5
    settle_batch_wait: float = 0.0
    rate: float = 50.0
    burst: int = 100
    max_body_bytes: int = MAX_BODY_BYTES
    idempotency_retention: float = DEFAULT_RETENTION
    explorer_url: str | None = None

    def __post_init__(self) -> None:
        for name in ("escrow", "token"):
            object.__setattr__(self, name, setting_address(getattr(self, name), f"FacilitatorConfig.{name}"))
        if not (isinstance(self.rate, (int, float)) and self.rate > 0):
            raise ConfigError(f"FacilitatorConfig.rate must be > 0 requests per second, got {self.rate!r}")
        if not (isinstance(self.burst, int) and self.burst >= 1):
            raise ConfigError(f"FacilitatorConfig.burst must be an integer >= 1, got {self.burst!r}")
        if not (isinstance(self.max_body_bytes, int) and self.max_body_bytes >= 1024):
            raise ConfigError(f"FacilitatorConfig.max_body_bytes must be >= 1024, got {self.max_body_bytes!r}")
        keep = self.idempotency_retention
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not (keep == 0 or keep >= MIN_RETENTION):
            raise ConfigError(
                f"FacilitatorConfig.idempotency_retention must be 0 (kept forever) or at least {MIN_RETENTION} "
                f"seconds, got {keep!r}"
            )
        url = self.explorer_url
        if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
            raise ConfigError(f"FacilitatorConfig.explorer_url must be an http(s) URL, got {url!r}")
        self.chain_settings()  # the shared checks of the chain settings

    def chain_settings(self) -> SellerConfig:
        """The settings of the seller's chain layer (seller_chain, DeliveryPoster), which the facilitator reuses.

        Only the chain fields are read by that layer; `pay_to` and the route are placeholders
        it requires (the facilitator serves every seller, and prices nothing).
        """
        return SellerConfig(
            rpc_url=self.rpc_url,
            escrow=self.escrow,
            token=self.token,
            network=self.network,
            pay_to=self.operator.address,
            operator=self.operator,
            routes=[PricedRoute("POST", "/settle", amount=1, max_timeout_seconds=max(self.min_time_left + 1, 120))],
            store=self.store,
            confirmations=self.confirmations,
            min_time_left=self.min_time_left,
            token_name=self.token_name,
            token_version=self.token_version,
            poster_interval=self.poster_interval,
            settle_batch_wait=self.settle_batch_wait,
            deadline_slack=self.deadline_slack,
            rpc_timeout=self.rpc_timeout,
            tx_timeout=self.tx_timeout,
            reprice_after=self.reprice_after,
            confirmation_depth=self.confirmation_depth,
            startup_checks=False,
        )

    @property
    def chain_id(self) -> int:
        return chain_id_of(self.network)
