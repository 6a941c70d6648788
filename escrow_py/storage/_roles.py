"""Which stores each role keeps, for `x402-escrow migrate` and `x402-escrow prune`.

Named as import paths, so the command imports only the role it works on. On PostgreSQL every role has its
own schema (its name), so one URL serves them all; on SQLite each role has its own file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from escrow_py.protocol.errors import ConfigError
from escrow_py.storage._migrate import Migration


@dataclass(frozen=True, slots=True)
class Store:
    namespace: str  # the PostgreSQL schema
    component: str  # the migration sequence's name
    migrations: str  # module:attribute of its Migration list
    prune: str | None = None  # module:attribute of `prune(db, *, before) -> counts`


ROLES: dict[str, tuple[Store, ...]] = {
    "keeper": (Store("keeper", "keeper", "escrow_py.keeper._store:MIGRATIONS", "escrow_py.keeper._store:prune"),),
    "buyer": (
        Store("buyer", "buyer", "escrow_py.buyer._journal:MIGRATIONS", "escrow_py.buyer._journal:prune"),
        Store("buyer", "audit", "escrow_py.buyer._audit:MIGRATIONS"),
    ),
    "seller": (Store("seller", "seller", "escrow_py.seller._store:MIGRATIONS", "escrow_py.seller._store:prune"),),
    # The facilitator's escrow store (the seller's tables, in its own schema) and its keys, idempotency and ledger.
    "facilitator": (
        Store("facilitator", "seller", "escrow_py.seller._store:MIGRATIONS", "escrow_py.seller._store:prune"),
        Store(
            "facilitator",
            "facilitator",
            "escrow_py.facilitator._tables:MIGRATIONS",
            "escrow_py.facilitator._keys:prune",
        ),
    ),
}


def load(path: str, role: str) -> Any:
    module, attribute = path.split(":")
    found = getattr(importlib.import_module(module), attribute, None)
    if found is None:
        raise ConfigError(f"the {role} store of this version has no {attribute} (not on the storage port yet)")
    return found


def migrations_of(store: Store, role: str) -> Sequence[Migration]:
    migrations: Sequence[Migration] = load(store.migrations, role)
    return migrations


def pruner_of(store: Store, role: str) -> Callable[..., dict[str, int]] | None:
    if store.prune is None:
        return None
    prune: Callable[..., dict[str, int]] = load(store.prune, role)
    return prune
