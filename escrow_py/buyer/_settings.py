"""The buyer's one settings object, taken by every entry point: EscrowClient, AsyncEscrowClient,
EscrowAuth, the SDK plugin (DeliveryEscrowScheme), the MCP client (EscrowToolClient) and recover().

    settings = BuyerSettings(signer, rpc_url, "buyer.sqlite", policy=Policy.from_toml("policy.toml"))
    with EscrowClient(settings, timeout=60) as client: ...
    recover(settings)

Each entry point also takes the signer, the RPC URL and the journal with BuyerSettings' keywords
(`EscrowClient(signer, rpc_url, "buyer.sqlite", task="research")`); `settings_of` turns that form into
a BuyerSettings, so the keywords are named, checked and defaulted here only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx
from web3 import Web3

from escrow_py.buyer._journal import Journal
from escrow_py.buyer._policy import Policy
from escrow_py.buyer._validate import Validator
from escrow_py.chain.port import EscrowChain
from escrow_py.chain.rpc import DEFAULT_DEADLINE
from escrow_py.chain.signer import Signer
from escrow_py.protocol.errors import ConfigError
from escrow_py.protocol.terms import Terms
from escrow_py.protocol.wire import EscrowRequirements


@runtime_checkable
class PaymentPolicy(Protocol):
    """A custom rule, asked before anything is signed (after the declarative Policy's offer rules and before
    its budgets); raise PolicyDenied (or any PaymentRefused) to deny."""

    def check(self, request: httpx.Request | None, requirements: EscrowRequirements, terms: Terms) -> None:
        """`request` is None when the SDK plugin pays (it never sees the request)."""
        ...


class AllowAll:
    """The default policy: pays every delivery-escrow 402."""

    def check(self, request: httpx.Request | None, requirements: EscrowRequirements, terms: Terms) -> None:
        return None


@dataclass(frozen=True, slots=True)
class ResendPolicy:
    """How a paid request answers the seller's own failures (a 503 with Retry-After, wire.Unavailable).

    The same PAYMENT-SIGNATURE is sent again after Retry-After, capped at `max_wait` seconds, at
    most `attempts` times, and never later than `margin` seconds before the authorization's
    validBefore (the seller needs time left to deposit and serve it). A fresh payment is never
    signed for it. `ResendPolicy(attempts=0)` turns resending off.
    """

    attempts: int = 4
    max_wait: float = 10.0
    margin: float = 20.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 0:
            raise ConfigError(f"ResendPolicy.attempts must be an integer >= 0, got {self.attempts!r}")
        for name in ("max_wait", "margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"ResendPolicy.{name} must be a number of seconds >= 0, got {value!r}")

    def next_wait(self, retry_after: int, *, resent: int, time_left: float) -> float | None:
        """Seconds to wait before resending after `resent` resends, with `time_left` seconds until
        `resend_until`; None: give up (no attempts left, or the wait would run past the margin)."""
        if resent >= self.attempts:
            return None
        wait = float(min(max(retry_after, 0), self.max_wait))
        return wait if wait <= time_left else None


JournalLike = str | Path | Journal


@dataclass(frozen=True, slots=True)
class BuyerSettings:
    """Who pays, on which chain, where payments are journaled, and the rules they are paid by.

    `journal`: a path, sqlite:/// or postgresql:// URL, or an open Journal (shared, not closed by the
    client). `policy`: a declarative Policy (rules and budgets, reserved in the ledger), a custom
    PaymentPolicy hook, or None (pay every offer; the ledger still records every payment). `task`
    names the budget a payment counts against (a request overrides it with the `x402_task` extension);
    `validator` checks delivered bodies (override: `x402_validator`). `w3` replaces the connection to
    `rpc_url`; `rpc_timeout` bounds every chain call, retries included; `resend` says how a 503 of the
    seller's own side is answered (the SDK plugin sends nothing itself, so it never resends). `chain`
    replaces the chain at `rpc_url` altogether with another EscrowChain (the unit tests' in-memory one).
    """

    signer: Signer
    rpc_url: str
    journal: JournalLike
    policy: Policy | PaymentPolicy | None = None
    task: str = "default"
    validator: Validator | None = None
    w3: Web3 | None = None
    rpc_timeout: float = DEFAULT_DEADLINE
    resend: ResendPolicy = field(default_factory=ResendPolicy)
    chain: EscrowChain | None = None

    def __post_init__(self) -> None:
        timeout = self.rpc_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"rpc_timeout must be a number of seconds > 0, got {timeout!r}")
        resend: object = self.resend
        if resend is None:  # the keyword form's spelling of "the default"
            object.__setattr__(self, "resend", ResendPolicy())
        elif not isinstance(resend, ResendPolicy):
            raise ConfigError(f"resend must be a ResendPolicy, got {resend!r}")
        if self.policy is not None and not isinstance(self.policy, (Policy, PaymentPolicy)):
            raise ConfigError(f"policy must be a Policy or have a check() method, got {self.policy!r}")
        if not isinstance(self.task, str):
            raise ConfigError(f"task must be a string, got {self.task!r}")
        if not isinstance(self.journal, (str, Path, Journal)):
            raise ConfigError(f"journal must be a path, a database URL or a Journal, got {self.journal!r}")


# The keywords an entry point passes on to BuyerSettings in the signer/rpc_url/journal form.
_KEYWORDS = frozenset(f.name for f in fields(BuyerSettings)) - {"signer", "rpc_url", "journal"}


def settings_of(
    settings: BuyerSettings | Signer, rpc_url: str | None, journal: JournalLike | None, options: dict[str, Any]
) -> BuyerSettings:
    """An entry point's arguments as one BuyerSettings: given as one, or as (signer, rpc_url, journal) with
    BuyerSettings' keywords, which are taken out of `options` (what is left is the caller's: httpx's
    keywords for the clients, an error for the others)."""
    taken = {name: options.pop(name) for name in list(options) if name in _KEYWORDS}
    if isinstance(settings, BuyerSettings):
        if rpc_url is not None or journal is not None or taken:
            given = sorted(taken) + [n for n, v in (("rpc_url", rpc_url), ("journal", journal)) if v is not None]
            raise ConfigError(f"give a BuyerSettings or the signer, rpc_url and journal, not both (also got {given})")
        return settings
    if rpc_url is None or journal is None:
        raise ConfigError("a buyer needs a BuyerSettings, or a signer, an rpc_url and a journal")
    return BuyerSettings(settings, rpc_url, journal, **taken)


def no_other_options(entry: str, options: dict[str, Any]) -> None:
    """Refuse keywords an entry point does not know (what settings_of left behind)."""
    if options:
        raise TypeError(f"{entry}() got unexpected keyword arguments {sorted(options)}")
