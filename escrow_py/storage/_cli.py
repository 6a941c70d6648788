"""`x402-escrow migrate` and `x402-escrow prune`: a store's schema and its retention, from the command line."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence

from escrow_py.protocol.errors import ConfigError
from escrow_py.storage import Migration, current_version, describe, is_postgres_url, migrate, open_database
from escrow_py.storage._roles import ROLES, Store, migrations_of, pruner_of

DEFAULT_GRACE = 7 * 86_400
ROLE_HELP = "the role whose store this is (repeatable; default: every role, PostgreSQL only)"


def register_migrate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from escrow_py.cli import COMMANDS

    mig = sub.add_parser(
        "migrate",
        help=COMMANDS["migrate"][0],
        description="On PostgreSQL every role keeps its tables in its own schema (keeper, buyer, seller, "
        "facilitator), so one URL serves all of them; on SQLite each role has its own file, so name the role.",
    )
    mig.add_argument("--db", required=True, help="postgresql://... URL, sqlite:///path or a path")
    mig.add_argument("--role", action="append", choices=sorted(ROLES), help=ROLE_HELP)
    mig.set_defaults(func=_migrate)


def register_prune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from escrow_py.cli import COMMANDS

    prune = sub.add_parser("prune", help=COMMANDS["prune"][0])
    prune.add_argument("--db", required=True, help="postgresql://... URL, sqlite:///path or a path")
    prune.add_argument("--role", action="append", choices=sorted(ROLES), help=ROLE_HELP)
    prune.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE,
        help=f"seconds past an escrow's deadline a settled row is kept (default {DEFAULT_GRACE}, 7 days; keep it "
        "longer than any buyer budget window and the keeper's reorg depth)",
    )
    prune.set_defaults(func=_prune)


def _roles(args: argparse.Namespace) -> list[str]:
    if args.role:
        return list(dict.fromkeys(args.role))
    if not is_postgres_url(args.db):
        raise ConfigError(f"--db {args.db}: a SQLite file holds one role's store; say which with --role")
    return sorted(ROLES)


def _stores(args: argparse.Namespace) -> Iterator[tuple[str, Store, Sequence[Migration]]]:
    """Each store of the roles asked for, with its migrations; a store not on the port yet is skipped (said so)
    when every role was meant, and an error when it was named."""
    for role in _roles(args):
        for store in ROLES[role]:
            try:
                migrations = migrations_of(store, role)
            except ConfigError as exc:
                if args.role:
                    raise
                print(json.dumps({"role": role, "store": store.component, "skipped": str(exc)}))
                continue
            yield role, store, migrations


def _migrate(args: argparse.Namespace) -> int:
    for role, store, migrations in _stores(args):
        db = open_database(args.db, store.namespace)
        try:
            applied = migrate(db, store.component, migrations)
            version = current_version(db, store.component)
        finally:
            db.close()
        print(json.dumps({"role": role, "store": store.component, "db": describe(args.db),
                          "applied": [m.version for m in applied], "version": version}))  # fmt: skip
    return 0


def _prune(args: argparse.Namespace) -> int:
    if args.grace < 0:
        raise ConfigError(f"--grace {args.grace}: must be zero or more seconds")
    before = time.time() - args.grace
    for role, store, migrations in _stores(args):
        pruner = pruner_of(store, role)
        if pruner is None:
            continue
        db = open_database(args.db, store.namespace)
        try:
            migrate(db, store.component, migrations)
            counts = pruner(db, before=before)
        finally:
            db.close()
        print(json.dumps({"role": role, "store": store.component, "before": round(before), "deleted": counts}))
    return 0
