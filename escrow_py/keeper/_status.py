"""`x402-escrow keeper status`: what the keeper's store holds against the chain's head, per escrow.

Its own module so that the command's parsing and settings (`_cli.py`) import no chain stack.
"""

from __future__ import annotations

import time

from escrow_py.chain.web3chain import connect_chain
from escrow_py.keeper._config import KeeperConfig
from escrow_py.keeper._decide import TOKEN_NOT_ALLOWED, Skip, next_action
from escrow_py.keeper._index import read_head
from escrow_py.keeper._store import QUARANTINED, SIMULATION, SUSPECT, KeeperStore
from escrow_py.protocol.errors import RpcError


def print_status(config: KeeperConfig) -> int:
    """What `x402-escrow keeper status` prints: per escrow, indexing lag, counts, open and troubled escrows."""
    store = KeeperStore(config.database)
    chain = connect_chain(config.rpc_url, deadline=config.rpc_timeout)
    try:
        try:
            head = read_head(chain)
        except RpcError as exc:
            raise RpcError(f"rpc_url = {config.rpc_url!r}: the node does not answer ({exc})") from None
        tokens = config.allowed_tokens()
        for address in config.escrows:
            _print_escrow(store, address, head=head.number, chain_time=head.timestamp, tokens=tokens)
        attempts = store.attempt_counts()
        if attempts:
            print("refund transactions: " + ", ".join(f"{k} {v}" for k, v in sorted(attempts.items())))
        print(f"chain time {head.timestamp} ({time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(head.timestamp))} UTC)")
    finally:
        store.close()
    return 0


def _print_escrow(
    store: KeeperStore, address: str, *, head: int, chain_time: int, tokens: frozenset[str] | None
) -> None:
    checkpoint = store.checkpoint(address)
    counts = store.counts(address)
    lag = "never indexed" if checkpoint is None else f"{head - checkpoint} blocks behind head {head}"
    print(f"escrow {address}: {lag}")
    print(f"  held {counts['held']}, released {counts['released']}, refunded {counts['refunded']}")
    open_ = store.open_escrows(address)
    expired = [e for e in open_ if e.deadline <= chain_time]
    print(f"  open escrows: {len(open_)} ({len(expired)} past their deadline)")
    not_allowed = sum(
        1
        for e in expired
        if next_action(e, chain_time, wall_time=time.time(), tokens=tokens) == Skip(TOKEN_NOT_ALLOWED)
    )
    if not_allowed:
        print(f"  left alone, token not in the allowlist: {not_allowed} (add it with --token or tokens = [...])")
    for entry in open_[:10]:
        when = entry.deadline - chain_time
        due = f"in {when}s" if when > 0 else f"{-when}s ago"
        print(f"    0x{entry.id.hex()}  {entry.terms.amount:>12}  deadline {entry.deadline} ({due})")
    quarantined = store.troubles(address, QUARANTINED)
    print(f"  quarantined: {len(quarantined)} (never sent again; the buyer can still refund it)")
    for trouble in quarantined[:10]:
        print(f"    0x{trouble.id.hex()}  {trouble.reason}")
    suspects, failing = store.troubles(address, SUSPECT), store.troubles(address, SIMULATION)
    if suspects:
        print(f"  being isolated after a batch reverted when mined: {len(suspects)}")
    if failing:
        print(f"  refund failing in simulation, retried every few minutes: {len(failing)}")
        for trouble in failing[:10]:
            print(f"    0x{trouble.id.hex()}  {trouble.reason}")
    backoffs = store.backoffs(address)
    held_back = sum(b.open_escrows for b in backoffs)
    print(f"  refunds the token refused, backing off: {len(backoffs)} buyers ({held_back} escrows)")
    now = time.time()
    for backoff in backoffs[:10]:
        wait = max(0, round(backoff.retry_at - now))
        print(f"    token {backoff.token} buyer {backoff.buyer}: {backoff.open_escrows} escrows, refused "
              f"{backoff.failures} times in a row, next try in {wait}s: {backoff.reason}")  # fmt: skip
