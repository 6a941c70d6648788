"""The buyer's spending policy: declarative rules, decided by pure functions, before anything is signed.

    policy = Policy.from_toml("policy.toml")     # or Policy(max_per_request=50_000, ...)

Two kinds of rule. The static ones (`check_offer`) look only at the offer: maximum per
request, maximum deadline, allowed networks, tokens, escrow contracts, sellers and
hosts. The budgets (`check_budgets`) also need what is already committed (spent plus
reserved), which the ledger supplies inside the same transaction that reserves the new
amount, so concurrent payments can never overspend. Every amount is in the token's
atomic units and every budget counts one token at a time (a budget in USDC says
nothing about EURC).

The TOML form, every key optional (an absent list allows everything):

    max_per_request = 50000          # 0.05 USDC
    max_deadline_seconds = 600
    networks = ["eip155:84532"]
    tokens = ["0x036CbD53842c5426634e7929541eC2318f3dCF7e"]
    escrows = ["0x..."]
    sellers = ["0x..."]
    hosts = ["api.example.com"]
    settlement = "hold"              # or "serve-first": the only mode paid (absent: either)

    [budget]
    total = 1000000                  # everything this journal ever pays
    per_task = 200000
    per_seller = 500000
    windows = [{seconds = 3600, amount = 100000}, {seconds = 86400, amount = 400000}]
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from escrow_py.protocol.codec import parse_address
from escrow_py.protocol.errors import ConfigError, ProtocolError
from escrow_py.protocol.reasons import Reason
from escrow_py.protocol.wire import SettlementMode, chain_id_of


@dataclass(frozen=True, slots=True)
class PaymentContext:
    """What a decision looks at: the offer as the buyer is about to sign it."""

    network: str
    token: str
    escrow: str
    seller: str
    host: str | None  # None when the payer never saw the request
    amount: int
    deadline_seconds: int  # deadline minus chain time
    task: str
    settlement: str = "hold"  # the offer's extra.settlement (wire.SettlementMode)


@dataclass(frozen=True, slots=True)
class Usage:
    """What is already committed (spent + reserved) in the context's token, as the ledger counts it."""

    total: int = 0
    task: int = 0
    seller: int = 0
    windows: Mapping[int, int] = field(default_factory=dict)  # window seconds -> committed within it


@dataclass(frozen=True, slots=True)
class Decision:
    """Allow or deny, with the rule and, for limits, the numbers: `limit`, `wanted`, `available`."""

    allowed: bool
    reason: Reason
    detail: str = ""
    limit: int | None = None
    wanted: int | None = None
    available: int | None = None


ALLOW = Decision(True, Reason.ALLOWED)


@dataclass(frozen=True, slots=True)
class WindowBudget:
    """At most `amount` committed within any `seconds`-long window ending now."""

    seconds: int
    amount: int


def _deny(reason: Reason, detail: str, **numbers: int | None) -> Decision:
    return Decision(False, reason, detail, **numbers)


def _addresses(values: Iterable[str] | None, name: str) -> frozenset[str] | None:
    if values is None:
        return None
    if isinstance(values, str):
        raise ConfigError(f"policy.{name} must be a list of addresses, got a string")
    checked = set()
    for value in values:
        try:
            checked.add(parse_address(value, f"policy.{name}"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return frozenset(checked)


def _amount(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"policy.{name} must be a non-negative integer (atomic units), got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Policy:
    """Declarative spending rules; None (or an absent list) means no limit. Validated when built."""

    max_per_request: int | None = None
    max_deadline_seconds: int | None = None
    total_budget: int | None = None
    task_budget: int | None = None
    seller_budget: int | None = None
    windows: tuple[WindowBudget, ...] = ()
    networks: frozenset[str] | None = None
    tokens: frozenset[str] | None = None
    escrows: frozenset[str] | None = None
    sellers: frozenset[str] | None = None
    hosts: frozenset[str] | None = None
    # "hold": serve-first offers are refused (the buyer wants the refund guarantee); "serve-first":
    # only serve-first offers are paid (the bytes before the money); None: either.
    settlement: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_per_request", "max_deadline_seconds", "total_budget", "task_budget", "seller_budget"):
            _amount(getattr(self, name), name)
        windows = tuple(self.windows)
        for window in windows:
            if not isinstance(window, WindowBudget) or window.seconds <= 0 or _amount(window.amount, "windows") is None:
                raise ConfigError(f"policy.windows: {window!r} must be WindowBudget(seconds > 0, amount >= 0)")
        object.__setattr__(self, "windows", windows)
        for name in ("tokens", "escrows", "sellers"):
            object.__setattr__(self, name, _addresses(getattr(self, name), name))
        if self.networks is not None:
            if isinstance(self.networks, str):
                raise ConfigError("policy.networks must be a list of CAIP-2 ids, got a string")
            for network in self.networks:
                try:
                    chain_id_of(network)
                except (ProtocolError, AttributeError):
                    raise ConfigError(f"policy.networks: {network!r} is not a CAIP-2 eip155 id") from None
            object.__setattr__(self, "networks", frozenset(self.networks))
        if self.hosts is not None:
            if isinstance(self.hosts, str):
                raise ConfigError("policy.hosts must be a list of host names, got a string")
            object.__setattr__(self, "hosts", frozenset(h.lower() for h in self.hosts))
        if self.settlement is not None:
            try:
                object.__setattr__(self, "settlement", SettlementMode(self.settlement).value)
            except ValueError:
                modes = [m.value for m in SettlementMode]
                raise ConfigError(f"policy.settlement must be one of {modes}, got {self.settlement!r}") from None

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Policy:
        """From the TOML layout (see the module docstring); unknown keys are errors, not ignored."""
        top = {
            "max_per_request", "max_deadline_seconds", "networks", "tokens", "escrows", "sellers", "hosts", "budget",
            "settlement",
        }  # fmt: skip
        if unknown := set(data) - top:
            raise ConfigError(f"policy: unknown keys {sorted(unknown)} (known: {sorted(top)})")
        budget = data.get("budget", {})
        if not isinstance(budget, Mapping):
            raise ConfigError("policy.budget must be a table")
        if unknown := set(budget) - {"total", "per_task", "per_seller", "windows"}:
            raise ConfigError(f"policy.budget: unknown keys {sorted(unknown)}")
        windows = []
        for window in budget.get("windows", []):
            if not isinstance(window, Mapping) or set(window) != {"seconds", "amount"}:
                raise ConfigError(f"policy.budget.windows: {window!r} must be {{seconds = ..., amount = ...}}")
            windows.append(WindowBudget(int(window["seconds"]), window["amount"]))

        def listed(name: str) -> frozenset[str] | None:
            value = data.get(name)
            if value is not None and (isinstance(value, str) or not isinstance(value, list)):
                raise ConfigError(f"policy.{name} must be a list")
            return None if value is None else frozenset(value)

        return cls(
            max_per_request=data.get("max_per_request"),
            max_deadline_seconds=data.get("max_deadline_seconds"),
            total_budget=budget.get("total"),
            task_budget=budget.get("per_task"),
            seller_budget=budget.get("per_seller"),
            windows=tuple(windows),
            networks=listed("networks"),
            tokens=listed("tokens"),
            escrows=listed("escrows"),
            sellers=listed("sellers"),
            hosts=listed("hosts"),
            settlement=data.get("settlement"),
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> Policy:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise ConfigError(f"cannot read the policy file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"the policy file {path} is not valid TOML: {exc}") from None
        return cls.from_mapping(data)

    # -- deciding (pure) -----------------------------------------------------------------------

    def check_offer(self, ctx: PaymentContext) -> Decision:
        """The rules that need nothing but the offer."""
        if self.max_per_request is not None and ctx.amount > self.max_per_request:
            return _deny(
                Reason.OVER_PER_REQUEST,
                f"{ctx.amount} exceeds the per-request maximum {self.max_per_request}",
                limit=self.max_per_request,
                wanted=ctx.amount,
            )
        if self.max_deadline_seconds is not None and ctx.deadline_seconds > self.max_deadline_seconds:
            return _deny(
                Reason.DEADLINE_TOO_FAR,
                f"the deadline is {ctx.deadline_seconds}s away, the maximum is {self.max_deadline_seconds}s",
                limit=self.max_deadline_seconds,
                wanted=ctx.deadline_seconds,
            )
        checks = (
            (self.networks, ctx.network, Reason.NETWORK_NOT_ALLOWED, "network"),
            (self.tokens, ctx.token, Reason.TOKEN_NOT_ALLOWED, "token"),
            (self.escrows, ctx.escrow, Reason.ESCROW_NOT_ALLOWED, "escrow"),
            (self.sellers, ctx.seller, Reason.SELLER_NOT_ALLOWED, "seller"),
            (_one(self.settlement), ctx.settlement, Reason.SETTLEMENT_NOT_ALLOWED, "settlement"),
        )
        for allowed, value, reason, name in checks:
            if allowed is not None and value not in allowed:
                return _deny(reason, f"{name} {value} is not in the allowed list {sorted(allowed)}")
        if self.hosts is not None:
            if ctx.host is None:
                return _deny(Reason.HOST_UNKNOWN, "a host allowlist is set but the request's host is unknown")
            if ctx.host.lower() not in self.hosts:
                return _deny(Reason.HOST_NOT_ALLOWED, f"host {ctx.host} is not in {sorted(self.hosts)}")
        return ALLOW

    def check_budgets(self, ctx: PaymentContext, usage: Usage) -> Decision:
        """The budgets, given what is already committed; the ledger calls this under its lock."""
        budgets = (
            (self.total_budget, usage.total, Reason.OVER_TOTAL_BUDGET, "the total budget"),
            (self.task_budget, usage.task, Reason.OVER_TASK_BUDGET, f"the budget of task {ctx.task!r}"),
            (self.seller_budget, usage.seller, Reason.OVER_SELLER_BUDGET, f"the budget for seller {ctx.seller}"),
        )
        for limit, used, reason, name in budgets:
            if limit is not None and used + ctx.amount > limit:
                return _over(reason, name, limit, used, ctx.amount)
        for window in self.windows:
            used = usage.windows.get(window.seconds, 0)
            if used + ctx.amount > window.amount:
                name = f"the {window.seconds}s window budget"
                return _over(Reason.OVER_WINDOW_BUDGET, name, window.amount, used, ctx.amount)
        return ALLOW


def _one(value: str | None) -> frozenset[str] | None:
    return None if value is None else frozenset({value})


def _over(reason: Reason, name: str, limit: int, used: int, wanted: int) -> Decision:
    available = max(0, limit - used)
    return _deny(
        reason,
        f"{wanted} exceeds what is left of {name}: {available} of {limit} (spent and reserved: {used})",
        limit=limit,
        wanted=wanted,
        available=available,
    )
